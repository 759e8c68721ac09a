"""Reinforcement learning pieces for PPO (losses, rollouts, value head)."""
