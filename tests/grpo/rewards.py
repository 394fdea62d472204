"""The tiny runs' reward: a module with no imports, as the reward workers import it at start-up."""


def parity_reward(response: str, ground_truth: str) -> float:
    """Half the random responses earn 1: a learnable signal that needs no correct arithmetic."""
    return float(sum(map(ord, response)) % 2)
