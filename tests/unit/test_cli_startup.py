"""The stop-signal handler of `gossiptrain` is in place before anything heavy is imported."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "hivemind", "numpy", "uvloop", "prometheus_client", "matplotlib")


def test_the_entry_point_imports_nothing_heavy_before_handling_stop_signals():
    # node/__main__.py and the console script import node.cli.main, whose main() installs the handler first
    # thing; everything it imported by then must be light, or a SIGTERM during those imports kills the node
    code = ("import sys, node.cli.main; "
            f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_main_installs_the_handler_before_it_imports_the_verbs(monkeypatch):
    import signal

    import node.cli.main as cli

    seen = []

    def fake_import(name):
        seen.append((name, signal.getsignal(signal.SIGTERM)))
        raise SystemExit(0)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    previous = {sig: signal.getsignal(sig) for sig in cli.STOP_SIGNALS}
    try:
        cli.main(["run"])
    except SystemExit:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert seen and seen[0][1] is cli.stop_before_start
