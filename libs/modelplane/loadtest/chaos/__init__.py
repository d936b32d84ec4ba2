"""`make chaos`: what the services do when things go wrong, as one table.

1. overload.py: the inference service at 5x its measured capacity (open loop, with
   deadlines): how fast it rejects, what the accepted calls' latency does, recovery.
2. slow_clients.py: 500 calls that send headers and never a body, and 500 idle client
   streams, on every service, while a normal client keeps calling.
3. crash.py: SIGKILL of registry, feature and monitoring under write load and a
   restart on the same data: acknowledged writes read back (none may be lost).
4. drain.py: SIGTERM under load: in-flight calls finish, new ones get UNAVAILABLE.

The plumbing: processes.py (services as child processes), workloads.py (each
service's writes, read-back and probe), drivers.py (the load loops), calls.py and
ledger.py (what was sent, answered and acknowledged), table.py (the output),
config.py (MODELPLANE_CHAOS_* knobs), runner.py (the entry point, bench/chaos.py).
"""
