"""The GRPO loop and what feeds it: the rollout manager, the train-batch preparation, the run's
components, evaluation, and the `miles rollout` job."""
