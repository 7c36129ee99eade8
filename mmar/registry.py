"""A registry of classes by name: the one behind ``@register_head`` and ``@register_tokenizer``.

A leaf module (no imports), so every package with a registry can use it without a cycle.
"""

from __future__ import annotations


class Registry(dict):
    """``{name: class}`` for one kind of plug-in (``what``: "head", "tokenizer"). ``unique``: a name taken by
    another class is an error (else the later class replaces the earlier)."""

    def __init__(self, what: str, unique: bool = False):
        super().__init__()
        self.what, self.unique = what, unique

    def register(self, name: str):
        """Class decorator: set ``cls.name`` and make the class available under ``name``."""

        def wrap(cls):
            if self.unique and name in self and self[name] is not cls:
                raise ValueError(f"{self.what} name {name!r} is already registered by {self[name].__name__}")
            cls.name = name
            self[name] = cls
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self)

    def lookup(self, name, where: str = ""):
        """The class registered as ``name``; an unknown name is a ``ValueError`` listing the known ones
        (``where``: a prefix naming the file it came from)."""
        if name not in self:
            raise ValueError(f"{where}unknown {self.what} {name!r}; registered: {', '.join(self.names())}")
        return self[name]
