"""``--section.key=value`` on the command line: the one parser every command uses
(``farsync train``, ``farsync wan``, the config builder). No torch, no config types:
values stay text here and are typed by :func:`farsync.train.config.build_config`."""

from __future__ import annotations


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments and ``--section.key=value`` overrides; ``--section.key value``
    is accepted and joined to ``--section.key=value``."""
    positional, overrides = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
                a = f"{a}={args[i + 1]}"
                i += 1
            overrides.append(a)
        else:
            positional.append(a)
        i += 1
    return positional, overrides


def parse_override(item: str) -> tuple[str, str, str]:
    """``--section.key=value`` (leading dashes optional) → (section, key, value text);
    ValueError when it does not look like that."""
    text = item[2:] if item.startswith("--") else item
    dotted, sep, raw = text.partition("=")
    section, dot, key = dotted.partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"override {item!r} must look like --section.key=value")
    return section, key, raw
