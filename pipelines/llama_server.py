"""llama-cpp-python's OpenAI-compatible server with llama.cpp's extra CPU buffer types turned off.

Run as a script (`python pipelines/llama_server.py --model ...`, same arguments as `-m llama_cpp.server`)
so it needs nothing from this project on the path. Extra buffer types are llama.cpp's weight repacking
and AMX kernels; a host that advertises AMX without letting a process use it (seen in VMs) kills the
server with SIGILL on its first prompt. The plain CPU kernels run everywhere.
"""

import runpy

import llama_cpp.llama_cpp as lib

_default_params = lib.llama_model_default_params


def _params_without_extra_buffer_types():
    params = _default_params()
    params.use_extra_bufts = False
    return params


lib.llama_model_default_params = _params_without_extra_buffer_types
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
