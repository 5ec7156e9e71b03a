"""What a run was measured on: device, driver, library versions, commit and date."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Environment:
    """What the numbers were measured on (``date`` in UTC, ISO 8601)."""

    device: str
    driver: str
    torch: str
    triton: str
    date: str
    gpu: bool
    python: str = ""
    cpu_threads: int = 0
    commit: str = "unknown"

    @property
    def slug(self) -> str:
        """The machine in a file name: the GPU's name, or ``cpu-`` and the CPU model and its
        core count, lower case, runs of other characters as one ``-``."""
        name = re.sub(r"\((R|TM)\)|\bCPU\b|@ [\d.]+\s*GHz", " ", self.device, flags=re.I)
        name = name if self.gpu else f"cpu {name}"
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> Environment:
    """Device name, driver, library versions, the checkout's commit and the date (UTC) of
    this run."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = _nvidia_driver() or "n/a"
    else:
        name = _cpu_name()
        driver = "n/a"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Environment(
        name,
        driver,
        torch.__version__,
        triton.__version__,
        date,
        device.type == "cuda",
        python=platform.python_version(),
        cpu_threads=torch.get_num_threads(),
        commit=git_commit(),
    )


def git_commit(root: Path = ROOT) -> str:
    """The checkout's commit, ``-dirty`` when tracked files differ from it; "unknown" in a tree
    copied without its ``.git``."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return head.stdout.strip() + dirty


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its core count."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return f"{name} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
