"""Argument checks: one clear error per bad input, raised before any work is spent.

Every check here is static (shapes, dtypes, Python values), so it costs nothing
under :func:`jax.jit`. The public functions and the frontends call these and
nothing else to validate what a user passed.
"""

from __future__ import annotations

from ._arrays import PARAM_KEYS as PARAM_KEYS
from ._arrays import STATE_KEYS as STATE_KEYS
from ._arrays import Array as Array
from ._arrays import batch_not_empty as batch_not_empty
from ._arrays import feature_axes as feature_axes
from ._arrays import feature_shape as feature_shape
from ._arrays import features_match as features_match
from ._arrays import floating_dtype as floating_dtype
from ._arrays import input_array as input_array
from ._arrays import mask as mask
from ._arrays import params as params
from ._arrays import state as state
from ._arrays import state_entries as state_entries
from ._arrays import values_per_feature as values_per_feature
from ._arrays import vector as vector
from ._axes import axis_index_groups as axis_index_groups
from ._axes import axis_name as axis_name
from ._axes import axis_size as axis_size
from ._axes import bound_axis_name as bound_axis_name
from ._axes import named_axes as named_axes
from ._modes import PRIOR_FORMS as PRIOR_FORMS
from ._modes import RESIDUALS as RESIDUALS
from ._modes import PriorForm as PriorForm
from ._modes import Residual as Residual
from ._modes import prior as prior
from ._modes import prior_form as prior_form
from ._modes import prior_option as prior_option
from ._modes import residual as residual
from ._modes import train as train
from ._options import bound as bound
from ._options import dmax as dmax
from ._options import found_batch_norms as found_batch_norms
from ._options import momentum as momentum
from ._options import passes as passes
from ._options import positive_float as positive_float
from ._options import positive_int as positive_int
from ._options import python_bool as python_bool
from ._options import real as real
from ._options import renorm as renorm
from ._options import rmax as rmax
from ._options import static_float as static_float
from ._options import virtual_batch_size as virtual_batch_size
