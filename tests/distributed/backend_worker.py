"""`python -m linearize` through accelerate's FSDP2 or DeepSpeed path on CPU ranks, for tests only.

    LINEARIZE_TEST_BACKEND=fsdp2|zero2|zero3 ACCELERATE_USE_CPU=1 \
        torchrun --nproc_per_node=2 backend_worker.py distill ...

accelerate turns on FSDP and DeepSpeed only for GPU (and other accelerator) ranks; on CPU ranks it stays
MULTI_CPU (and under `accelerate launch --cpu` every DeepSpeed rank would run alone). Here the accelerator
linearize makes gets the plugin of the shipped launch config (linearize/launch/fsdp2.yaml, zero2.yaml,
zero3.yaml) and reports that distributed type, so everything after it runs the code a GPU run would, over
gloo: prepare(), the engine's backward and step, save_state/load_state of sharded checkpoints, the sharded
frozen teacher, gathering the student after a stage. DeepSpeed runs with DS_ACCELERATOR=cpu. Under FSDP2 a
rank other than 0 that reads a model's weights through transformers fails.
"""

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

import linearize.distributed as distributed
from linearize.cli import main

BACKEND = os.environ["LINEARIZE_TEST_BACKEND"]
PINNED = DistributedType.FSDP if BACKEND == "fsdp2" else DistributedType.DEEPSPEED


def _distributed_type(state):
    # pinned from the moment the plugin is set: accelerate rewrites the state's distributed_type from the
    # CPU backend more than once (e.g. in prepare()), so it is read through this property, not stored
    if state.__dict__.get("fsdp_plugin") is not None or state.__dict__.get("deepspeed_plugins") is not None:
        return PINNED
    return state.__dict__.get("_distributed_type", state.__dict__.get("distributed_type"))


def _set_distributed_type(state, value):
    state.__dict__["_distributed_type"] = value


AcceleratorState.distributed_type = property(_distributed_type, _set_distributed_type)
make_accelerator = distributed.make_accelerator


def make_pinned_accelerator(recipe):
    if BACKEND != "fsdp2":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # before accelerate makes its own process group
    accelerator = make_accelerator(recipe)
    if BACKEND == "fsdp2":
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
            cpu_ram_efficient_loading=True,
        )
    else:
        plugin = DeepSpeedPlugin(
            zero_stage=int(BACKEND.removeprefix("zero")), offload_optimizer_device="none"
        )
        if BACKEND == "zero3":  # the default threshold (1e5 elements) would keep this tiny teacher whole
            plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        plugin.set_mixed_precision("no")
        accelerator.state.deepspeed_plugins = plugin
        plugin.select(_from_accelerator_state=True)
        accelerator.deepspeed_engine_wrapped = None  # what Accelerator(deepspeed_plugin=...) sets
    return accelerator


distributed.make_accelerator = make_pinned_accelerator

if BACKEND == "fsdp2" and os.environ.get("RANK", "0") != "0":
    # Under FSDP2 only rank 0 reads weights (the others build the model empty and receive their shards): any
    # weight file another rank opens through transformers fails the run.
    import transformers

    def _refuse(cls, *args, **kwargs):
        raise RuntimeError(
            f"rank {os.environ['RANK']} read a model's weights ({cls.__name__}.from_pretrained)"
        )

    transformers.PreTrainedModel.from_pretrained = classmethod(_refuse)
sys.exit(main(sys.argv[1:]))
