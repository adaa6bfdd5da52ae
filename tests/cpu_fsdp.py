"""Turn accelerate's FSDP path on for CPU processes (gloo), for the FSDP tests' worker scripts.

accelerate enables FSDP only for GPU backends: a CPU launch with an FSDP config trains with DDP.
`install()` makes the trainer switch accelerate's state to FSDP right after accelerate built it,
with the plugin read from the launch config (the FSDP_* variables `accelerate launch` sets). From
there on accelerate's own FSDP2 code runs: `fully_shard` per decoder layer, the optimizer on
DTensor shards, save and load of the FSDP model and optimizer state.
"""

from __future__ import annotations


def install() -> None:
    """Make `lte.training.trainer.LTETrainer` (what `train_stage` and `lte.training.LTETrainer` give)
    a subclass that enables accelerate's FSDP on CPU processes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import lte.training.trainer as trainer_module

    class CPUFSDPTrainer(trainer_module.LTETrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU:
                state.fsdp_plugin = FullyShardedDataParallelPlugin()  # the launch config's FSDP_* settings
                state.distributed_type = DistributedType.FSDP
                # as accelerate does for its own FSDP state: every later AcceleratorState() reads it from here
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.is_fsdp_enabled = True

    trainer_module.LTETrainer = CPUFSDPTrainer
