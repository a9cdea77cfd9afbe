"""Running the model on devices: device detection and dtype (devices), one replica per device (replica), the
engine of worker threads pulling batches from one bounded queue (engine, build_engine: the one place that resolves
devices, dtype, replicas and the token budget), batch planning (batching), windows of long proteins (windows) and
modeled GPUs for benchmarks on the CPU (modeled).

May import model, io, config and errors; never jobs, serve or cli.
"""
