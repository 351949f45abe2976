"""farsync: DiLoCo and Streaming DiLoCo for training across slow links."""

__version__ = "0.1.0"
