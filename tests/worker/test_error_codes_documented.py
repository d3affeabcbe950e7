"""Every code the worker can store on a failed job is documented in the API's error table."""

from __future__ import annotations

import ast
import inspect

import worker.errors as worker_errors
from app.api.errors import JOB_ERROR_CODES

# A cancelled job ends in the state `cancelled`, not as a failure with an error code.
NOT_A_FAILURE = {"cancelled"}


def _worker_error_codes() -> set[str]:
    classes = {cls.code for cls in vars(worker_errors).values()
               if inspect.isclass(cls) and issubclass(cls, worker_errors.WorkerError)}
    # describe_exception also builds ErrorDescription("<code>", ...) for foreign exceptions.
    tree = ast.parse(inspect.getsource(worker_errors))
    literals = {node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ErrorDescription"
                and node.args and isinstance(node.args[0], ast.Constant)}
    return (classes | literals) - NOT_A_FAILURE


def test_every_worker_error_code_is_in_the_documented_table() -> None:
    codes = _worker_error_codes()
    assert "gpu_rank_failed" in codes and "heal_unavailable" in codes  # the scan sees both kinds
    assert codes - set(JOB_ERROR_CODES) == set()
