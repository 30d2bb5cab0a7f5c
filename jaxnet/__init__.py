"""jaxnet: train neural networks in JAX's purely functional, compiled style."""

from jaxnet.base import Batch as Batch
from jaxnet.base import Model as Model
from jaxnet.base import Params as Params
from jaxnet.base import PRNGKey as PRNGKey
from jaxnet.base import TrainState as TrainState
from jaxnet.layers import ACTIVATIONS as ACTIVATIONS
from jaxnet.layers import activation_layer as activation_layer
from jaxnet.layers import batched as batched
from jaxnet.layers import default_initializer as default_initializer
from jaxnet.layers import dense as dense
from jaxnet.layers import get_activation as get_activation
from jaxnet.layers import mlp as mlp
from jaxnet.layers import serial as serial
from jaxnet.layers import with_params as with_params
from jaxnet.loop import FitState as FitState
from jaxnet.loop import NonFiniteLossError as NonFiniteLossError
from jaxnet.loop import epoch_batches as epoch_batches
from jaxnet.loop import fit as fit
from jaxnet.loop import make_epoch as make_epoch
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
from jaxnet.parallel import batch_sharding as batch_sharding
from jaxnet.parallel import check_batch_size as check_batch_size
from jaxnet.parallel import global_rows as global_rows
from jaxnet.parallel import initialize_distributed as initialize_distributed
from jaxnet.parallel import is_primary as is_primary
from jaxnet.parallel import make_data_mesh as make_data_mesh
from jaxnet.parallel import process_rows as process_rows
from jaxnet.parallel import replicated as replicated
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

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Batch",
    "FitState",
    "LOSSES",
    "LossSpec",
    "Model",
    "NonFiniteLossError",
    "PRNGKey",
    "Params",
    "TrainState",
    "accuracy",
    "activation_layer",
    "batch_mean",
    "batch_sharding",
    "batched",
    "best_member",
    "binary_accuracy",
    "check_batch_size",
    "check_memory",
    "default_initializer",
    "dense",
    "dp_aggregate",
    "dp_optimizer",
    "epoch_batches",
    "estimate_member_bytes",
    "fit",
    "get_activation",
    "get_loss",
    "global_rows",
    "half_sum_squares",
    "init_members",
    "init_state",
    "initialize_distributed",
    "is_primary",
    "make_data_mesh",
    "make_epoch",
    "make_eval_fn",
    "make_loss_fn",
    "make_per_example_update",
    "make_train_step",
    "make_update",
    "mean_squared_error",
    "member_grid",
    "member_keys",
    "member_scores",
    "memory_limit",
    "mlp",
    "process_rows",
    "replicated",
    "per_example_grad_norms",
    "per_example_grads",
    "serial",
    "set_hyperparams",
    "skip_nonfinite_updates",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "take_member",
    "with_params",
]
