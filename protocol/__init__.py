"""Wire protocol of gossiptrain (pair exchange, state sync): framing, messages, tensor transfer, manifest hash.

Pure data handling only (stdlib, msgpack, numpy): no torch, no networking, no
asyncio, so it can be used and tested in isolation. See SPEC.md for the
protocol itself.

The package exports what each module lists in its ``__all__``; the field
validators (``protocol.fields``) and the verification records
(``protocol.verification``) are imported from their modules.
"""

from protocol import errors, framing, manifest, messages, tensors
from protocol.errors import *  # noqa: F401,F403
from protocol.framing import *  # noqa: F401,F403
from protocol.manifest import *  # noqa: F401,F403
from protocol.messages import *  # noqa: F401,F403
from protocol.tensors import *  # noqa: F401,F403

__all__ = sorted({
    name
    for module in (errors, framing, manifest, messages, tensors)
    for name in module.__all__
})
