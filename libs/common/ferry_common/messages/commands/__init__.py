"""The commands, answers and queries between the coordinator, the host services and the
client, one module per concept: :mod:`.steps` (the saga's steps, their answers and where each
goes), :mod:`.vms` (a VM's place under management, ownership leases, adoption) and
:mod:`.queries`. Every name is importable from here, as it always was.
"""

from . import queries, steps, vms
from .queries import *  # noqa: F403
from .steps import *  # noqa: F403
from .vms import *  # noqa: F403

#: the modules whose models are on the wire (messages.registry collects them)
MODULES = (steps, vms, queries)
