"""The Tansu broker the tests start and stop (lives in feedback/bus/tansu.py: the benchmarks use it too)."""
from feedback.bus.tansu import TansuBroker, answers_api_versions, free_port, tansu_binary  # noqa: F401
