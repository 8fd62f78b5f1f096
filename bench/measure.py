"""Run a command and measure its wall time and the peak memory of its whole process tree.

The tree matters: a LocalCluster's workers are child processes, and their memory is
most of a stage's footprint. RSS is sampled every 0.1 s, summed over the tree (peak
of the sum), and also reported per process (the largest single process: a worker).
"""

import subprocess
import sys
import threading
import time

import psutil


def run_measured(command, cwd=None, env=None, interval=0.1):
    """Run `command`; return {'seconds', 'peak_rss_bytes', 'peak_process_rss_bytes', 'returncode', 'output'}."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"tree": 0, "process": 0}
    done = threading.Event()

    def sample():
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                rss = []
                for member in tree:
                    try:
                        rss.append(member.memory_info().rss)
                    except psutil.Error:
                        pass
                peaks["tree"] = max(peaks["tree"], sum(rss))
                peaks["process"] = max(peaks["process"], max(rss, default=0))
            except psutil.Error:
                pass
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = []
    for line in process.stdout:
        output.append(line)
        sys.stdout.write(line)
    process.wait()
    done.set()
    sampler.join()
    return {"seconds": time.monotonic() - started, "peak_rss_bytes": peaks["tree"],
            "peak_process_rss_bytes": peaks["process"], "returncode": process.returncode, "output": "".join(output)}
