"""The demo world: tiny offline models and tasks in which merging beats every parent.

See :func:`evomerge.demo.world.build_world` and :mod:`evomerge.demo.tasks`.
"""

from evomerge.demo.tasks import write_task_data, write_tasks
from evomerge.demo.world import MODEL_NAMES, build_world

__all__ = ["MODEL_NAMES", "build_world", "write_task_data", "write_tasks"]
