"""Makes ``import mlflow`` fail in the test suite's subprocesses (``tests/conftest.py`` puts the folder above this
package first on their ``PYTHONPATH``).

Every bundle process imports ``monai.handlers``, whose MLflow handler imports mlflow whenever it is installed
(``requirements-dev.txt`` installs it for ``tests/test_tracking.py``): about 1 s of CPU per process, and the suite
starts well over a hundred of them. MONAI imports it through ``optional_import``, which records this ImportError and
leaves MLflow tracking unavailable, as in an environment made from ``requirements.txt`` alone. Tests that track with
MLflow run their subprocesses without this folder (``tests.bundle_runner.environment(with_mlflow=True)``).
"""

raise ImportError("mlflow is blocked in the test suite's subprocesses (tests/mlflow_blocked); see its docstring")
