"""Where MiniVault's CPU goes: `python -m bench.profile request|ws-relay|sse-first-token`.

Starts the fast fake and MiniVault (the Dockerfile's command), drives one workload, samples the
server with py-spy for a few seconds and writes bench/results/profile-<workload>.txt: CPU share
per package, then the hottest frames. Needs py-spy (requirements-dev.txt) and ptrace rights.
"""

import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import streams
from bench.procs import ROOT, Served, start_fake, start_minivault
from bench.run import GENERATE_BODY
from bench.wrk import run_wrk

SECONDS = 6


async def _drive(workload: str, minivault: Served, until: float) -> None:
    if workload == "request":
        await asyncio.to_thread(run_wrk, f"{minivault.url}/generate", GENERATE_BODY, 16, SECONDS + 1)
        return
    url = f"ws://127.0.0.1:{minivault.port}/ws/generate"
    client = streams.RawHttp(minivault.port)
    while time.monotonic() < until:
        if workload == "ws-relay":
            await asyncio.gather(*(streams._ws_stream(url, streams.prompt(256, 1), 1) for _ in range(8)))
        else:
            await client.first_token("/generate", {"prompt": streams.prompt(2, 0), "stream": True}, b"event: token")
    await client.close()


def _py_spy() -> str:
    """py-spy from PATH, or the one installed beside this Python (make bench does not activate the venv)."""
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def summarize(raw: Path) -> str:
    packages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # The writer thread and the event loop idling in epoll (uvloop's C code) are not request work.
        if "Thread" in frames[0] or "threading" in frames[0] or "Runner.run" in frames[-1]:
            continue
        samples = int(count)
        total += samples
        leaves[frames[-1]] += samples
        match = re.search(r"\(([^:)]*)", frames[-1])
        path = match.group(1) if match else "?"
        packages[path.split("/")[0] if "/" in path else path] += samples
    lines = [f"busy samples: {total}", "", "CPU share by package (where the sampled frame is):"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in packages.most_common(12)]
    lines += ["", "hottest frames (self time):"]
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in leaves.most_common(25)]
    return "\n".join(lines) + "\n"


def main() -> None:
    workload = sys.argv[1] if len(sys.argv) > 1 else "request"
    if workload not in ("request", "ws-relay", "sse-first-token"):
        raise SystemExit("usage: python -m bench.profile request|ws-relay|sse-first-token")
    with tempfile.TemporaryDirectory(prefix="minivault-profile-") as tmp:
        workdir = Path(tmp)
        fake = start_fake(workdir)
        minivault = start_minivault(workdir, fake.url)
        raw = workdir / "raw.txt"
        try:
            sampler = subprocess.Popen(
                [_py_spy(), "record", "--pid", str(minivault.process.pid), "--duration", str(SECONDS), "--rate", "1000",
                 "--format", "raw", "--output", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            asyncio.run(_drive(workload, minivault, time.monotonic() + SECONDS + 1))
            sampler.wait(timeout=60)
        finally:
            minivault.stop()
            fake.stop()
        report = f"py-spy profile of MiniVault, workload {workload!r} (python -m bench.profile {workload})\n\n"
        report += summarize(raw)
    output = ROOT / "bench" / "results" / f"profile-{workload}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
