"""Batch jobs without Serve: `ClusterRunner` (worker actors in a placement group, driven by `cluster.driver`) and
`kvcomm submit` (a file of jobs, resumable results; on a local runner, or against a running deployment with
``--url``)."""
