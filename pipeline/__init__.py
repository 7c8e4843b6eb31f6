"""MMRNS: relation-enhanced negative sampling for multimodal knowledge graph completion.

The importable library. Nothing here parses command lines or knows the repository's file
layout; the DVC stage commands in ``stages/`` do that and call into this package.
"""
