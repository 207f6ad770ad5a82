"""Simulated users and steady load against a running gateway, through its public HTTP API only.

- `simulate.users.SimulatedUsers`: users who compare, rank and rate answers by a preference rule
  (`simulate.rules`) with label noise (`simulate.judge`); `feedloop simulate` (`simulate.cli`).
- `simulate.load.SteadyLoad`: a steady stream of generation requests, every one recorded (hot swaps).

Kept empty on purpose: `feedloop`'s parser imports `simulate.cli`, and every other command should not
pay for importing httpx.
"""
