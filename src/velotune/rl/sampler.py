"""The order prompts are drawn in: each prompt num_generations times in a row, each generation batch
repeated for every step that trains on it (TRL's `RepeatSampler` layout, our own code).

    unique prompts per generation batch = generation_batch_size / num_generations
    indices: [a a a b b b] x (steps_per_generation x num_iterations), then the next prompts
The trainer's dataloader yields one generation batch per `steps_per_generation` steps' worth of rows;
the repeats keep transformers' step counting right while the trainer reuses what it generated.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GroupRepeatSampler(Sampler):
    def __init__(self, size: int, num_generations: int, prompts_per_batch: int, repeat: int, shuffle: bool = True,
                 seed: int = 0):
        self.size, self.num_generations, self.prompts_per_batch = size, num_generations, prompts_per_batch
        self.repeat, self.shuffle, self.seed = repeat, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        whole = self.size - self.size % self.prompts_per_batch  # an incomplete last batch is dropped
        for start in range(0, whole, self.prompts_per_batch):
            chunk = order[start:start + self.prompts_per_batch]
            for _ in range(self.repeat):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        whole = self.size - self.size % self.prompts_per_batch
        return whole * self.num_generations * self.repeat
