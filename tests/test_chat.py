"""`minivault chat` through a real pseudo-terminal, as a person types it."""

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer

ROOT = Path(__file__).resolve().parent.parent


def _own_terminal() -> None:
    # A session of its own with the pty as controlling terminal, so Ctrl-C there is a SIGINT for the CLI.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """The CLI on the slave side of a pty; `expect` reads until a pattern shows up (or fails after `within`)."""

    def __init__(self, *args: str, url: str) -> None:
        self.controller, terminal = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "app/cli.py", "chat", *args],
            cwd=ROOT, stdin=terminal, stdout=terminal, stderr=terminal,
            env={**os.environ, "MINIVAULT_URL": url, "TERM": "dumb"}, preexec_fn=_own_terminal,
        )  # fmt: skip
        os.close(terminal)
        self.screen = ""

    def expect(self, pattern: str, within: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + within
        while not (found := re.search(pattern, self.screen)):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.controller], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"{pattern!r} never showed up; the screen:\n{self.screen}")
            self.screen += os.read(self.controller, 4096).decode(errors="replace").replace("\r\n", "\n")
        self.screen = self.screen[found.end() :]
        return found

    def type(self, text: str) -> None:
        os.write(self.controller, text.encode())

    def close(self) -> int:
        try:
            return self.process.wait(timeout=20)
        finally:
            os.close(self.controller)


@pytest.fixture
def terminal(minivault: RunningServer) -> Iterator[Terminal]:
    opened = Terminal(url=minivault.url)
    try:
        yield opened
    finally:
        if opened.process.poll() is None:
            opened.process.kill()
            opened.close()


def chat_messages(fake: FakeOllama) -> list[list[tuple[str, str]]]:
    return [[(m["role"], m["content"]) for m in r["messages"]] for r in fake.requests if r.get("chat")]


def test_chat_keeps_the_conversation_and_ctrl_c_stops_only_the_answer(
    terminal: Terminal, fake: FakeOllama, minivault: RunningServer
) -> None:
    conversation_id = terminal.expect(r"conversation ([0-9a-f]{32}) \(")[1]
    terminal.expect(">>> ")
    terminal.type("red green\n")
    terminal.expect("red green\n>>> ")
    terminal.type("blue\n")
    terminal.expect("blue\n>>> ")
    assert chat_messages(fake)[-1] == [("user", "red green"), ("assistant", "red green"), ("user", "blue")]

    terminal.type("/new\n")
    fresh_id = terminal.expect(r"conversation ([0-9a-f]{32})\n")[1]
    assert fresh_id != conversation_id
    terminal.expect(">>> ")  # typed before the prompt shows, the line's echo would come first
    terminal.type("yellow\n")
    terminal.expect("yellow\n>>> ")
    assert chat_messages(fake)[-1] == [("user", "yellow")]

    terminal.type("/bye\n")
    assert terminal.close() == 0


def test_ctrl_c_stops_the_answer_without_leaving_and_keeps_no_turn(
    terminal: Terminal, fake: FakeOllama, minivault: RunningServer
) -> None:
    terminal.expect(">>> ")
    fake.delay = 0.05
    terminal.type("one two three four five six seven eight nine ten eleven twelve\n")
    terminal.expect("twelve\n")  # the terminal's echo of the typed line
    terminal.expect("one two ")  # the answer is streaming
    terminal.type("\x03")
    terminal.expect(r"\(stopped\)\n>>> ")
    fake.wait_until(lambda f: f.disconnects == 1, timeout=5)
    fake.delay = 0
    terminal.type("after\n")
    terminal.expect("after\n>>> ")
    # The stopped answer was not kept: the next prompt went up alone.
    assert chat_messages(fake)[-1] == [("user", "after")]
    terminal.type("\x04")  # Ctrl-D leaves
    assert terminal.close() == 0


def test_chat_resumes_a_conversation_by_id(minivault: RunningServer, fake: FakeOllama) -> None:
    first = Terminal(url=minivault.url)
    conversation_id = first.expect(r"conversation ([0-9a-f]{32}) \(")[1]
    first.expect(">>> ")
    first.type("remember this\n")
    first.expect("remember this\n>>> ")
    first.type("/bye\n")
    assert first.close() == 0

    again = Terminal("--conversation", conversation_id, url=minivault.url)
    again.expect(r"resuming remember this: 1 turns so far")
    again.expect(">>> ")
    again.type("and now\n")
    again.expect("and now\n>>> ")
    again.type("/bye\n")
    assert again.close() == 0
    assert chat_messages(fake)[-1] == [("user", "remember this"), ("assistant", "remember this"), ("user", "and now")]


def test_resuming_an_unknown_conversation_fails_with_one_line(minivault: RunningServer) -> None:
    result = subprocess.run(
        [sys.executable, "app/cli.py", "chat", "--conversation", "nope", "--url", minivault.url],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("minivault: not_found: no conversation with id 'nope'")
