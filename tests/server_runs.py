"""Start web_demo.py as a user does (one process, or under msrun with 2 workers), wait until it
answers /health, and stop it again."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from scripts.bench_serve import data_url  # noqa: F401  (the tests' requests send media as the benchmark's do)
from tests.script_runs import ROOT, calm_msrun, free_port, msrun_command, msrun_worker, script_env

START_TIMEOUT = 300


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path  # stdout and stderr of the launch (msrun's console under msrun)
    log_dir: Optional[Path] = None  # msrun's worker logs

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes, timeout: float = 300) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def worker_log(self, rank: int) -> str:
        return (self.log_dir / f"worker_{rank}.log").read_text(errors="replace")

    def rank(self, rank: int):
        """The msrun worker process of `rank` (psutil.Process), or None."""
        return msrun_worker(self.process.pid, rank)

    def stop(self) -> int:
        """SIGTERM to the server (under msrun, to rank 0, which stops the others); its exit code.
        Whatever is left of its processes after that is killed, so that no test leaves workers behind."""
        import psutil

        if self.process.poll() is None:
            family = psutil.Process(self.process.pid).children(recursive=True)
            rank_0 = self.rank(0) if self.log_dir else None
            (rank_0 or self.process).send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
            for process in family:
                if process.is_running():
                    process.kill()
        return self.process.wait()


def start_server(
    args: list[str],
    folder: Path,
    msrun: bool = False,
    cluster_time_out: int = 60,
    while_loading: Optional[Callable[[Server, dict], None]] = None,
    **env: str,
) -> Server:
    """Start it (`env`: variables of its environment) and wait for /health to say "ready"; `while_loading(server,
    health)` is called once if /health is seen answering while the model still loads."""
    port = free_port()
    argv = [*args, "--port", str(port)]
    log = folder / "server.log"
    if msrun:
        log_dir = folder / "msrun_log"
        command = msrun_command("web_demo.py", argv, log_dir, cluster_time_out=cluster_time_out)
    else:
        log_dir, command = None, [sys.executable, str(ROOT / "web_demo.py"), *argv]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=script_env(**env), cwd=folder)
    if msrun:
        calm_msrun(process, log_dir)
    server = Server(process, f"http://127.0.0.1:{port}", log, log_dir)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            health = server.get("/health")
        except OSError:
            time.sleep(0.1)  # often: the model of the tiny checkpoint loads in about a second after /health answers
            continue
        if health["status"] == "ready":
            return server
        if while_loading is not None:
            while_loading(server, health)
            while_loading = None
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the server did not answer /health in {START_TIMEOUT} s")


def wav_samples(wav: bytes) -> tuple[np.ndarray, int, int]:
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return samples, rate, sf.info(io.BytesIO(wav)).channels
