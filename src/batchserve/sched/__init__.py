"""What the two batch loops (`batcher`: whole batches; `stepper`: continuous, between denoising
steps) decide with. One request queue for every policy (`request_queue`: admission, priority
with aging, deadlines, cancellation, drain), the per-shape models (`latency`: batch time against
batch size; `patience`: how long clients wait and the AIMD cap; `batchsize`: the largest batch
that fit in memory; `adaptive` holds them per shape), the finish-time rules built on them
(`deadlines`), running a batch with OOM splitting and poison isolation (`retry`), and the
watchdog for hung engine calls (`watchdog`). No torch, no HTTP."""
