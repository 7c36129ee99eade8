"""``python -m tests.record_shards train ...``: ``mmar train`` that also writes, per process, the sample
indices of every training batch it collates (one JSON line ``{"epoch": e, "indices": [...]}`` a batch, to
``$MMAR_RECORD_SHARDS/rank<process index>.jsonl``), so the multi-process tests can check the data sharding itself:
each global step's batches disjoint across processes and together the one-process run's batch.

Test-side only: it swaps the trainer's collator class (mmar.training.lifecycle's, where setup builds it) for a
recording subclass before running the CLI."""

import json
import os
import sys

from accelerate import PartialState

from mmar.cli import main
from mmar.data.registry import Collator
from mmar.training import lifecycle


class RecordingCollator(Collator):
    def __call__(self, samples):
        rank = PartialState().process_index  # the trainer's accelerator has set the process group up
        path = os.path.join(os.environ["MMAR_RECORD_SHARDS"], f"rank{rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "indices": [item[0] for item in samples]}) + "\n")
        return super().__call__(samples)


if __name__ == "__main__":
    lifecycle.Collator = RecordingCollator  # setup (mmar.training.lifecycle) builds the run's collator
    sys.exit(main(sys.argv[1:]))
