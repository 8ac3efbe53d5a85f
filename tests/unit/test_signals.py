"""The one signal queue, with real signals sent to this process."""

from __future__ import annotations

import os
import signal
import threading
import time

from clustermap.signals import SignalQueue


def test_a_signal_is_queued_and_cuts_the_wait_short() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with SignalQueue((signal.SIGUSR1, signal.SIGUSR2)) as q:
        assert not q
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        q.wait(600)  # would hang the test if the signal did not wake it
        assert time.monotonic() - t0 < 300
        assert q
        assert [q.pop(), q.pop(), q.pop()] == [signal.SIGUSR2, signal.SIGUSR1, None]
    assert signal.getsignal(signal.SIGUSR1) is before  # restored on exit


def test_another_thread_can_wake_the_loop() -> None:
    with SignalQueue((signal.SIGUSR1,)) as q:
        threading.Thread(target=q.wake).start()
        q.wait(600)
        assert not q  # woken, but no signal queued


def test_restore_may_keep_the_handlers_of_a_process_on_its_way_out() -> None:
    q = SignalQueue((signal.SIGUSR1,)).install()
    q.close(handlers=False)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # queued, not fatal
        deadline = time.monotonic() + 60
        while not q and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs at the main thread's next check
        assert q.pop() == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
