"""Write one section of bench/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
ARCHIVE = "Archived"  # sections whose title starts so stay at the end of the file


def machine() -> str:
    import jax

    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), jax {jax.__version__}"


def write_section(title: str, body: str, command: str) -> None:
    """Add or replace the `## {title}` section with the command that made it, the machine and `body`."""
    arguments = " ".join(sys.argv[1:])
    section = (
        f"## {title}\n\nCommand: `{command}`"
        + (f" (arguments: `{arguments}`)" if arguments else "")
        + f"\n\nMachine: {machine()}.\n\n{body.strip()}\n"
    )
    existing = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmarks\n"
    start = existing.find(f"## {title}\n")
    if start < 0:  # a new section goes before the archived ones, if any
        archive = existing.find(f"\n## {ARCHIVE}")
        if archive >= 0:
            updated = existing[: archive + 1] + section + "\n" + existing[archive + 1 :]
        else:
            updated = existing.rstrip("\n") + "\n\n" + section
    else:
        end = existing.find("\n## ", start + 1)
        updated = existing[:start] + section + ("\n" + existing[end + 1 :] if end >= 0 else "")
    with open(RESULTS, "w") as out:
        out.write(updated)


def publish(title: str, lines: list[str], command: str, write: bool = True) -> None:
    """Print a bench's section and, unless told not to (`--no_write`), write it to RESULTS.md."""
    text = "\n".join(lines)
    print("\n" + text)
    if write:
        write_section(title, text, command)
