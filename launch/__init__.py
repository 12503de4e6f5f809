"""Launching dllm runs: `launch.tpu` (Cloud TPU VM slices through gcloud: create, set
up, run, watch and recreate on preemption, delete) and `launch.local` (N processes on
this machine over a loopback coordinator)."""
