"""memlayers on ``torch.distributed``: data-parallel training that keeps each rank's memories
(``prepare_ddp``, ``prepare_fully_shard``), checkpoints with per-rank memories (``state_dict``,
``load_state_dict``, ``save``, ``load`` with ``torch.distributed.checkpoint``), and the column-sharded value table of
``ProductKeyMemory(..., process_group=...)``. The sharded kNN store is ``KNNMemory(..., process_group=...)``.
See docs/distributed.md.
"""
from .checkpoint import load, load_state_dict, save, state_dict
from .columns import column_range, column_widths, gather_columns, sharded_bag
from .data_parallel import bind_memories, per_rank_names, prepare_ddp, prepare_fully_shard, sharded_parameters

__all__ = ["bind_memories", "column_range", "column_widths", "gather_columns", "load", "load_state_dict", "save", "per_rank_names", "prepare_ddp",
           "prepare_fully_shard", "sharded_bag", "sharded_parameters", "state_dict"]
