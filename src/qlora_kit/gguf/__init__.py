"""GGUF: llama.cpp's converter from the pinned llama-cpp-python sdist, the checks a GGUF
must pass, the Ollama Modelfile, and the one way the kit opens a GGUF.
"""
