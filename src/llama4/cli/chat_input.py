"""What `llama4 chat` reads: lines with readline editing and history, and the /commands among them.

A line that starts with `/` and a word is a command, never a message: a typo such as `/hlep` is
reported rather than sent to the model. Media named by `/image` and `/video` are checked when typed,
so a wrong path is reported at once, not after the next message has been written.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

HELP = """commands:
  /help          this list (not sent to the model)
  /reset         forget the conversation (the --system prompt stays)
  /image PATH    attach an image to the next message (path, file:// or data: URL)
  /video PATH    attach a video to the next message
  /exit          leave (so does Ctrl-D)
Ctrl-C stops the reply being written; the conversation goes on. Arrow keys edit the line and
recall earlier ones."""

COMMANDS = ("/help", "/reset", "/image", "/video", "/exit")
_COMMAND = re.compile(r"/([A-Za-z]\w*)(?:\s+(.*))?\s*")


def parse_command(line: str) -> tuple[str, str] | None:
    """(command, argument) for a `/word ...` line, else None (an ordinary message)."""
    m = _COMMAND.fullmatch(line.strip())
    return None if m is None else ("/" + m.group(1), (m.group(2) or "").strip())


def line_reader(interactive: bool, prompt: str = "> ") -> Callable[[], str | None]:
    """A function returning the next line (without its newline), or None at end of input.

    On a terminal it is `input()` with readline loaded, which gives line editing and an in-session
    history; Ctrl-C there raises KeyboardInterrupt for the caller to turn into a fresh prompt. Piped
    input is read line by line, with undecodable bytes replaced (U+FFFD) instead of ending the chat.
    """
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        try:
            stdin.reconfigure(errors="replace")
        except (ValueError, OSError):  # already read from, or detached: keep its own handler
            pass
    if interactive:
        try:
            import readline  # noqa: F401  (importing it is what makes input() edit lines)
        except ImportError:  # Windows, or a Python built without it: plain input() still works
            pass

        def read_tty() -> str | None:
            try:
                return input(prompt)
            except EOFError:
                print(file=sys.stderr)
                return None
        return read_tty

    def read_pipe() -> str | None:
        line = stdin.readline()
        return line.rstrip("\n") if line else None
    return read_pipe


def check_media(kind: str, source: str, allowed_dirs=None) -> None:
    """Raise ValueError/FileNotFoundError now if `source` cannot be used as a `kind` ('image' or 'video')."""
    from ..media.image import load_image, open_source

    if not source:
        raise ValueError(f"/{kind} needs a path: /{kind} PATH")
    if kind == "image":
        load_image(source, allowed_dirs=allowed_dirs)  # decodes it: corrupt files are caught here too
        return
    from ..media.video import import_av

    import_av()
    _, fp = open_source(source, "video", allowed_dirs=allowed_dirs)
    fp.close()
