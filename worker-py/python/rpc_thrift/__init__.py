"""rpc_thrift: the Python side of the rpc_proxy mesh.

- :class:`RpcWorker` serves a Thrift processor to an rpc_lb (a worker, layer L4).
- :func:`current_call` and :class:`CallContextFilter` tell handler code and its log records
  which call runs (method, seqid); pool threads are named ``rpc_thrift-worker-<n>``.
- :func:`get_base_protocol` / :func:`get_service_protocol` (in :mod:`rpc_thrift.utils`) give
  clients a multiplexed, framed, binary protocol to the local rpc_proxy.

The message types the mesh adds to Thrift's (CONTRACT section 2) are exported as constants.
"""

from rpc_thrift._worker import DEFAULT_MAX_FRAME_SIZE, __version__
from rpc_thrift.context import CallContextFilter, CallInfo, current_call
from rpc_thrift.utils import get_base_protocol, get_service_protocol
from rpc_thrift.worker import RpcWorker

#: Heartbeat ``("ping", 20, seqid)``: echoed unchanged by LBs and workers.
MESSAGE_TYPE_HEART_BEAT = 20
#: Worker to LB: take me out of rotation ``("stop", 21, 0)``.
MESSAGE_TYPE_STOP = 21
#: LB to worker: STOP confirmed, or nothing new is coming ``("stop_confirm", 22, 0)``.
MESSAGE_TYPE_STOP_CONFIRM = 22
#: Worker to LB, first frame: ``("hello", 23, 0)`` with ``{1: pool_size, 2: pid, 3: service}``.
MESSAGE_TYPE_HELLO = 23

__all__ = [
    "CallContextFilter",
    "CallInfo",
    "DEFAULT_MAX_FRAME_SIZE",
    "MESSAGE_TYPE_HEART_BEAT",
    "MESSAGE_TYPE_HELLO",
    "MESSAGE_TYPE_STOP",
    "MESSAGE_TYPE_STOP_CONFIRM",
    "RpcWorker",
    "__version__",
    "current_call",
    "get_base_protocol",
    "get_service_protocol",
]
