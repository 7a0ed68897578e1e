"""`python -m linearize` with accelerate's FSDP2 path on CPU ranks, for tests only.

accelerate turns on FSDP only for GPU (and other accelerator) ranks; on CPU ranks it stays MULTI_CPU. Here
the accelerator linearize makes gets an FSDP2 plugin and reports distributed_type FSDP, so everything after
it (prepare, save_state/load_state of sharded checkpoints, the sharded frozen teacher, gathering the student
after a stage) runs the FSDP2 code a GPU run would, over gloo. Run under torchrun with ACCELERATE_USE_CPU=1.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import linearize.convert.pipeline as pipeline
from linearize.cli import main


def _distributed_type(state):
    # FSDP from the moment the plugin is set: accelerate rewrites the state's distributed_type from the CPU
    # backend more than once (e.g. in prepare()), so it is read through this property, not stored
    if state.__dict__.get("fsdp_plugin") is not None:
        return DistributedType.FSDP
    return state.__dict__.get("_distributed_type", state.__dict__.get("distributed_type"))


def _set_distributed_type(state, value):
    state.__dict__["_distributed_type"] = value


AcceleratorState.distributed_type = property(_distributed_type, _set_distributed_type)
make_accelerator = pipeline.make_accelerator


def make_fsdp2_accelerator(recipe):
    accelerator = make_accelerator(recipe)
    # the shipped fsdp2 launch config's settings (linearize/launch/fsdp2.yaml)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=True,
    )
    return accelerator


pipeline.make_accelerator = make_fsdp2_accelerator
sys.exit(main(sys.argv[1:]))
