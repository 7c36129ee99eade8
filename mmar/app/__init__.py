"""The front doors: the command line (``cli``), the terminal chat (``chat``) and the Gradio demo (``demo``).

Each takes the model's modality list from the loaded model; none spells a modality out."""
