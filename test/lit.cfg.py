# -*- Python -*-
# lit configuration of the Flex tests.

import os
import sys

import lit.formats
from lit.llvm import llvm_config

config.name = "Flex"
config.test_format = lit.formats.ShTest(not llvm_config.use_lit_shell)
config.suffixes = [".mlir", ".test"]
config.excludes = ["CMakeLists.txt", "lit.cfg.py", "lit.site.cfg.py", "Inputs"]
config.test_source_root = os.path.dirname(__file__)
config.test_exec_root = os.path.join(config.flex_obj_root, "test")

# Variables captured in one CHECK line must not leak into the next function.
config.environment["FILECHECK_OPTS"] = "-enable-var-scope --allow-unused-prefixes=false"

llvm_config.use_default_substitutions()
config.substitutions.append(("%flex_src_root", config.flex_src_root))
config.substitutions.append(("%python", sys.executable))
config.substitutions.append(("%moe_opt", os.path.join(config.flex_tools_dir, "moe-opt")))
config.substitutions.append(("%examples", os.path.join(config.flex_src_root, "examples")))

tool_dirs = [config.flex_tools_dir, config.llvm_tools_dir]
llvm_config.add_tool_substitutions(["moe-opt", "moe-run"], tool_dirs)
llvm_config.with_environment("PATH", config.flex_tools_dir, append_path=True)
llvm_config.with_environment("PATH", config.llvm_tools_dir, append_path=True)
