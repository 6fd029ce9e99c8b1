"""Ties the fork server's life to the launcher's: imported by the fork server alone (the
first module it preloads, see ``processes.launch``).

The fork server exits by itself when the launcher's end of its pipe closes, but only
after tearing down an interpreter that has imported torch and megatron-core, which on a
loaded machine can take longer than the launcher's death takes to notice. With
PR_SET_PDEATHSIG the kernel kills it the moment the launcher dies, however it dies.
"""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _in_fork_server() -> bool:
    return "multiprocessing.forkserver" in sys.modules and sys.argv[:1] == ["-c"]


if sys.platform.startswith("linux") and _in_fork_server():
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
