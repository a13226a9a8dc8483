"""Exporters: an IntProgram -> other formats (ONNX, integer operators only)."""
