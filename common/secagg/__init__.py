"""Secure aggregation with distributed discrete Gaussian noise: plain functions, no transport.

`discrete_gaussian` samples N_Z(0, σ²); `encoding` turns a device's update into integers mod 2^b
(and a modular sum back into floats); `ddg_accounting` is the privacy of the noisy sum;
`protocol` is SecAgg+ as state machines whose messages are plain dicts of bytes, ints and arrays.
"""
