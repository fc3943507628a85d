"""offsite: offsite-tuning of Hugging Face causal LMs.

Data flows one way: base model -> emulator bundle (owner) -> adapter bundle (data owner)
-> plugged model (owner) -> report.
"""

__version__ = "0.1.0"
