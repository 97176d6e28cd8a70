"""wrk, the load generator, driven with a Lua script that reports its figures as JSON."""

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
%s
function done(summary, latency, requests)
  io.write(string.format('{"requests": %%d, "errors": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench installs it as root)")
    return binary


def run_wrk(url: str, body: str, connections: int, seconds: float, headers: dict[str, str] | None = None) -> WrkResult:
    pairs = (headers or {}).items()
    extra = "\n".join(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in pairs)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_SCRIPT % (json.dumps(body), extra))
    try:
        result = subprocess.run(
            [wrk_binary(), "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        )  # fmt: skip
    finally:
        Path(script.name).unlink()
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return WrkResult(figures["requests"], figures["errors"], figures["duration_us"] / 1e6,
                     figures["p50_us"] / 1000, figures["p99_us"] / 1000)  # fmt: skip
