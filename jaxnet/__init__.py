"""jaxnet: train neural networks in JAX's purely functional, compiled style.

The public API is listed in ``__all__``. Names are imported from their modules on first use
(PEP 562), so that ``import jaxnet`` and the command line's ``--help`` do not pay for importing
jax until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "from_equinox": "adapters",
    "from_flax": "adapters",
    "from_haiku": "adapters",
    "from_nnx": "adapters",
    "BATCH_AXIS": "base",
    "Batch": "base",
    "Context": "base",
    "StatefulModel": "base",
    "Model": "base",
    "PRNGKey": "base",
    "Params": "base",
    "TrainState": "base",
    "epoch_batches": "epoch",
    "make_epoch": "epoch",
    "num_batches": "epoch",
    "apply_batch": "forward",
    "apply_example": "forward",
    "init_model": "forward",
    "is_stateful": "forward",
    "ACTIVATIONS": "layers",
    "activation_layer": "layers",
    "as_stateful": "layers",
    "avg_pool": "layers",
    "attention": "layers",
    "batch_norm": "layers",
    "batched": "layers",
    "conv": "layers",
    "conv1d": "layers",
    "conv2d": "layers",
    "default_initializer": "layers",
    "dense": "layers",
    "dropout": "layers",
    "embedding": "layers",
    "flatten": "layers",
    "global_avg_pool": "layers",
    "global_max_pool": "layers",
    "layer_norm": "layers",
    "max_pool": "layers",
    "multi_head_attention": "layers",
    "reshape": "layers",
    "residual": "layers",
    "transformer_block": "layers",
    "get_activation": "layers",
    "mlp": "layers",
    "serial": "layers",
    "with_params": "layers",
    "evaluate": "inference",
    "predict": "inference",
    "predict_batches": "inference",
    "DataError": "sources",
    "GrainMap": "sources",
    "Indexed": "sources",
    "NpyFile": "sources",
    "Parquet": "sources",
    "RowView": "sources",
    "Sequential": "sources",
    "npy_folder": "sources",
    "FitState": "loop",
    "NonFiniteLossError": "loop",
    "fit": "loop",
    "fitting_batch_size": "loop",
    "init_fit_state": "loop",
    "gpt": "lm",
    "GPTConfig": "lm",
    "decay_mask": "lm",
    "generate": "decoding",
    "sample_logits": "decoding",
    "IGNORE_INDEX": "losses",
    "Callback": "hooks",
    "LOSSES": "losses",
    "LossSpec": "losses",
    "accuracy": "losses",
    "batch_mean": "losses",
    "binary_accuracy": "losses",
    "get_loss": "losses",
    "half_sum_squares": "losses",
    "mean_squared_error": "losses",
    "sigmoid_binary_cross_entropy": "losses",
    "softmax_cross_entropy": "losses",
    "Metric": "metrics",
    "get_metric": "metrics",
    "top_k_accuracy": "metrics",
    "summary": "summaries",
    "Summary": "summaries",
    "best_member": "members",
    "check_memory": "members",
    "estimate_member_bytes": "members",
    "init_members": "members",
    "member_grid": "members",
    "member_keys": "members",
    "member_scores": "members",
    "memory_limit": "members",
    "set_hyperparams": "members",
    "take_member": "members",
    "batch_sharding": "parallel",
    "check_batch_size": "parallel",
    "global_rows": "parallel",
    "initialize_distributed": "parallel",
    "is_primary": "parallel",
    "make_data_mesh": "parallel",
    "process_rows": "parallel",
    "replicated": "sharding",
    "grouped": "groups",
    "lora": "lowrank",
    "load_params": "transfer",
    "partition": "groups",
    "with_ema": "averaging",
    "skip_spikes": "step",
    "repeat": "layers",
    "make_mesh": "sharding",
    "init_sharded": "sharding",
    "param_specs": "sharding",
    "dp_aggregate": "step",
    "dp_optimizer": "step",
    "init_state": "step",
    "make_eval_fn": "step",
    "make_loss_fn": "step",
    "make_per_example_update": "step",
    "make_train_step": "step",
    "make_update": "step",
    "step_key": "step",
    "per_example_grad_norms": "step",
    "per_example_grads": "step",
    "skip_nonfinite_updates": "step",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static tools see the plain imports
    from jaxnet.adapters import from_equinox as from_equinox
    from jaxnet.adapters import from_flax as from_flax
    from jaxnet.adapters import from_haiku as from_haiku
    from jaxnet.adapters import from_nnx as from_nnx
    from jaxnet.averaging import with_ema as with_ema
    from jaxnet.base import BATCH_AXIS as BATCH_AXIS
    from jaxnet.base import Batch as Batch
    from jaxnet.base import Context as Context
    from jaxnet.base import Model as Model
    from jaxnet.base import Params as Params
    from jaxnet.base import PRNGKey as PRNGKey
    from jaxnet.base import StatefulModel as StatefulModel
    from jaxnet.base import TrainState as TrainState
    from jaxnet.decoding import generate as generate
    from jaxnet.decoding import sample_logits as sample_logits
    from jaxnet.epoch import epoch_batches as epoch_batches
    from jaxnet.epoch import make_epoch as make_epoch
    from jaxnet.epoch import num_batches as num_batches
    from jaxnet.forward import apply_batch as apply_batch
    from jaxnet.forward import apply_example as apply_example
    from jaxnet.forward import init_model as init_model
    from jaxnet.forward import is_stateful as is_stateful
    from jaxnet.groups import grouped as grouped
    from jaxnet.groups import partition as partition
    from jaxnet.hooks import Callback as Callback
    from jaxnet.inference import evaluate as evaluate
    from jaxnet.inference import predict as predict
    from jaxnet.inference import predict_batches as predict_batches
    from jaxnet.layers import ACTIVATIONS as ACTIVATIONS
    from jaxnet.layers import activation_layer as activation_layer
    from jaxnet.layers import as_stateful as as_stateful
    from jaxnet.layers import attention as attention
    from jaxnet.layers import avg_pool as avg_pool
    from jaxnet.layers import batch_norm as batch_norm
    from jaxnet.layers import batched as batched
    from jaxnet.layers import conv as conv
    from jaxnet.layers import conv1d as conv1d
    from jaxnet.layers import conv2d as conv2d
    from jaxnet.layers import default_initializer as default_initializer
    from jaxnet.layers import dense as dense
    from jaxnet.layers import dropout as dropout
    from jaxnet.layers import embedding as embedding
    from jaxnet.layers import flatten as flatten
    from jaxnet.layers import get_activation as get_activation
    from jaxnet.layers import global_avg_pool as global_avg_pool
    from jaxnet.layers import global_max_pool as global_max_pool
    from jaxnet.layers import layer_norm as layer_norm
    from jaxnet.layers import max_pool as max_pool
    from jaxnet.layers import mlp as mlp
    from jaxnet.layers import multi_head_attention as multi_head_attention
    from jaxnet.layers import repeat as repeat
    from jaxnet.layers import reshape as reshape
    from jaxnet.layers import residual as residual
    from jaxnet.layers import serial as serial
    from jaxnet.layers import transformer_block as transformer_block
    from jaxnet.layers import with_params as with_params
    from jaxnet.lm import GPTConfig as GPTConfig
    from jaxnet.lm import decay_mask as decay_mask
    from jaxnet.lm import gpt as gpt
    from jaxnet.loop import FitState as FitState
    from jaxnet.loop import NonFiniteLossError as NonFiniteLossError
    from jaxnet.loop import fit as fit
    from jaxnet.loop import fitting_batch_size as fitting_batch_size
    from jaxnet.loop import init_fit_state as init_fit_state
    from jaxnet.losses import IGNORE_INDEX as IGNORE_INDEX
    from jaxnet.losses import LOSSES as LOSSES
    from jaxnet.losses import LossSpec as LossSpec
    from jaxnet.losses import accuracy as accuracy
    from jaxnet.losses import batch_mean as batch_mean
    from jaxnet.losses import binary_accuracy as binary_accuracy
    from jaxnet.losses import get_loss as get_loss
    from jaxnet.losses import half_sum_squares as half_sum_squares
    from jaxnet.losses import mean_squared_error as mean_squared_error
    from jaxnet.losses import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
    from jaxnet.losses import softmax_cross_entropy as softmax_cross_entropy
    from jaxnet.lowrank import lora as lora
    from jaxnet.members import best_member as best_member
    from jaxnet.members import check_memory as check_memory
    from jaxnet.members import estimate_member_bytes as estimate_member_bytes
    from jaxnet.members import init_members as init_members
    from jaxnet.members import member_grid as member_grid
    from jaxnet.members import member_keys as member_keys
    from jaxnet.members import member_scores as member_scores
    from jaxnet.members import memory_limit as memory_limit
    from jaxnet.members import set_hyperparams as set_hyperparams
    from jaxnet.members import take_member as take_member
    from jaxnet.metrics import Metric as Metric
    from jaxnet.metrics import get_metric as get_metric
    from jaxnet.metrics import top_k_accuracy as top_k_accuracy
    from jaxnet.parallel import batch_sharding as batch_sharding
    from jaxnet.parallel import check_batch_size as check_batch_size
    from jaxnet.parallel import global_rows as global_rows
    from jaxnet.parallel import initialize_distributed as initialize_distributed
    from jaxnet.parallel import is_primary as is_primary
    from jaxnet.parallel import make_data_mesh as make_data_mesh
    from jaxnet.parallel import process_rows as process_rows
    from jaxnet.sharding import init_sharded as init_sharded
    from jaxnet.sharding import make_mesh as make_mesh
    from jaxnet.sharding import param_specs as param_specs
    from jaxnet.sharding import replicated as replicated
    from jaxnet.sources import DataError as DataError
    from jaxnet.sources import GrainMap as GrainMap
    from jaxnet.sources import Indexed as Indexed
    from jaxnet.sources import NpyFile as NpyFile
    from jaxnet.sources import Parquet as Parquet
    from jaxnet.sources import RowView as RowView
    from jaxnet.sources import Sequential as Sequential
    from jaxnet.sources import npy_folder as npy_folder
    from jaxnet.step import dp_aggregate as dp_aggregate
    from jaxnet.step import dp_optimizer as dp_optimizer
    from jaxnet.step import init_state as init_state
    from jaxnet.step import make_eval_fn as make_eval_fn
    from jaxnet.step import make_loss_fn as make_loss_fn
    from jaxnet.step import make_per_example_update as make_per_example_update
    from jaxnet.step import make_train_step as make_train_step
    from jaxnet.step import make_update as make_update
    from jaxnet.step import per_example_grad_norms as per_example_grad_norms
    from jaxnet.step import per_example_grads as per_example_grads
    from jaxnet.step import skip_nonfinite_updates as skip_nonfinite_updates
    from jaxnet.step import skip_spikes as skip_spikes
    from jaxnet.step import step_key as step_key
    from jaxnet.summaries import Summary as Summary
    from jaxnet.summaries import summary as summary
    from jaxnet.transfer import load_params as load_params


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxnet.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
