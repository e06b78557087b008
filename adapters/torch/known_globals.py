"""Framework objects that training checkpoints pickle, recorded inertly.

Training files hold more than tensors: Hugging Face ``training_args.bin`` is
a pickled ``TrainingArguments`` full of Enums (``IntervalStrategy`` via
``REDUCE``), DeepSpeed optimizer states name ``ZeroStageEnum``, Lightning
checkpoints carry OmegaConf ``DictConfig`` hyper-parameters and name builtin
types as values (``__builtin__.list``), DCP's ``.metadata`` is a pickle of
``torch.distributed.checkpoint`` dataclasses. None of these run code when
*recorded* instead of constructed, so the names below become
``ObjectRecord``s (class name + arguments/state): shown by ``inspect``,
carried through every format, written back by the torch writer, never
imported nor called. Anything not listed is still refused (exit 3), unless
a run adds it with ``--allow-global MODULE.NAME`` / ``allow_globals=`` (like
torch's ``torch.serialization.add_safe_globals``).

Each name has a role, which says which pickle constructions of it are read:

- ``ENUM``: ``cls(value)`` by ``REDUCE`` with one plain value (how
  ``enum.Enum.__reduce_ex__`` pickles a member) -> record of kind "reduce";
- ``RECORD``: ``cls.__new__(cls)`` by ``NEWOBJ`` then ``BUILD`` (dataclasses,
  config objects) -> record of kind "newobj"; a ``REDUCE`` call of one is
  refused (``torch.load`` of it would run ``__init__``, which these pickles
  never do);
- ``DICT``: a dict subclass, by ``NEWOBJ`` (or ``REDUCE`` with a factory for
  ``defaultdict``) then ``SETITEMS`` -> record whose state holds the items;
- ``PATH``: ``cls(*parts)`` by ``REDUCE`` with strings (``pathlib``);
- ``TYPE``: only named as a value (``GLOBAL`` then used as data, e.g. a
  ``defaultdict`` factory or OmegaConf's ``object_type``) -> record of kind
  "global".

Every role may also be named as a value. Sources: the classes' own modules in
transformers 4.x, accelerate 1.x, DeepSpeed 0.1x, lightning 2.x, omegaconf
2.x, torch 2.x (``torch/distributed/checkpoint/metadata.py``,
``filesystem.py``); CPython ``Lib/_compat_pickle.py`` for the Python 2
spellings protocol 2 writes (``__builtin__.long`` is ``builtins.int``).
"""
from __future__ import annotations

ENUM, RECORD, DICT, PATH, TYPE = "enum", "record", "dict", "path", "type"


def _names(module: str, role: str, *names: str) -> dict[str, str]:
    return {f"{module}.{n}": role for n in names}


KNOWN_GLOBALS: dict[str, str] = {
    # Hugging Face transformers: TrainingArguments (training_args.bin) and its Enums
    **_names("transformers.training_args", RECORD, "TrainingArguments"),
    **_names("transformers.training_args_seq2seq", RECORD, "Seq2SeqTrainingArguments"),
    **_names("transformers.training_args", ENUM, "OptimizerNames", "ParallelMode"),
    **_names("transformers.trainer_utils", ENUM, "IntervalStrategy", "SaveStrategy",
             "EvaluationStrategy", "HubStrategy", "HPSearchBackend", "SchedulerType",
             "FSDPOption"),
    **_names("transformers.debug_utils", ENUM, "DebugOption"),
    **_names("transformers.trainer_pt_utils", RECORD, "AcceleratorConfig"),
    **_names("transformers.generation.configuration_utils", RECORD, "GenerationConfig"),
    # accelerate (TrainingArguments.distributed_state, Accelerator configs)
    **_names("accelerate.state", RECORD, "PartialState", "AcceleratorState", "GradientState"),
    **_names("accelerate.utils.dataclasses", ENUM, "DistributedType", "SageMakerDistributedType",
             "ComputeEnvironment", "DynamoBackend", "LoggerType", "PrecisionType", "RNGType",
             "DDPCommunicationHookType", "FP8BackendType", "CustomDtype"),
    **_names("accelerate.utils.dataclasses", RECORD, "DataLoaderConfiguration",
             "ProjectConfiguration", "GradientAccumulationPlugin", "AutocastKwargs",
             "DistributedDataParallelKwargs", "GradScalerKwargs", "InitProcessGroupKwargs",
             "TorchDynamoPlugin", "DeepSpeedPlugin", "FullyShardedDataParallelPlugin"),
    # DeepSpeed optimizer and model states
    **_names("deepspeed.runtime.zero.config", ENUM, "ZeroStageEnum"),
    **_names("deepspeed.runtime.zero.offload_config", ENUM, "OffloadDeviceEnum",
             "OffloadStateTypeEnum"),
    **_names("deepspeed.runtime.fp16.loss_scaler", RECORD, "LossScaler", "DynamicLossScaler"),
    # bf16 ZeRO optimizer states: param_slice_mappings of (numel, start) dataclasses
    **_names("deepspeed.utils.tensor_fragment", RECORD, "fragment_address"),
    # Lightning hyper-parameters
    **_names("lightning.fabric.utilities.data", DICT, "AttributeDict"),
    **_names("lightning_fabric.utilities.data", DICT, "AttributeDict"),
    **_names("lightning.pytorch.utilities.parsing", DICT, "AttributeDict"),
    **_names("pytorch_lightning.utilities.parsing", DICT, "AttributeDict"),
    # OmegaConf containers and nodes (Lightning's save_hyperparameters of a DictConfig)
    **_names("omegaconf.dictconfig", RECORD, "DictConfig"),
    **_names("omegaconf.listconfig", RECORD, "ListConfig"),
    **_names("omegaconf.base", RECORD, "ContainerMetadata", "Metadata"),
    **_names("omegaconf.base", ENUM, "SCMode"),
    **_names("omegaconf.nodes", RECORD, "AnyNode", "StringNode", "PathNode", "IntegerNode",
             "BytesNode", "FloatNode", "BooleanNode", "EnumNode", "NoneNode"),
    # torch.distributed.checkpoint (DCP) .metadata and planner records
    **_names("torch.distributed.checkpoint.metadata", RECORD, "Metadata", "TensorStorageMetadata",
             "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
             "TensorProperties", "StorageMeta"),
    **_names("torch.distributed.checkpoint.metadata", ENUM, "_MEM_FORMAT_ENCODING"),
    **_names("torch.distributed.checkpoint.filesystem", RECORD, "_StorageInfo",
             "_StoragePrefix"),
    **_names("torch.distributed.checkpoint.filesystem", ENUM, "SerializationFormat"),
    **_names("torch.distributed.checkpoint.planner", ENUM, "WriteItemType", "LoadItemType"),
    # builtin types named as values (defaultdict factories, OmegaConf object_type)
    **_names("builtins", TYPE, "list", "dict", "set", "frozenset", "tuple", "int", "float",
             "complex", "str", "bytes", "bytearray", "bool", "object"),
    **_names("collections", TYPE, "OrderedDict", "deque"),
    **_names("collections", DICT, "defaultdict"),
    **_names("typing", TYPE, "Any"),
    # filesystem paths (output_dir, logging_dir, ...): strings, never touched
    **_names("pathlib", PATH, "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
             "PureWindowsPath"),
}

# Python 2 spellings that protocol 0-2 pickles use (CPython Lib/_compat_pickle.py
# NAME_MAPPING/IMPORT_MAPPING, the entries that name a type above)
PY2_NAMES = {"__builtin__.long": "builtins.int", "__builtin__.unicode": "builtins.str",
             "__builtin__.basestring": "builtins.str", "__builtin__.xrange": "builtins.range"}
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "UserDict": "collections"}


def py3_qualname(qualname: str) -> str:
    """The Python 3 name of a global as ``pickle`` resolves it (``__builtin__.list``
    -> ``builtins.list``)."""
    if qualname in PY2_NAMES:
        return PY2_NAMES[qualname]
    module, _, name = qualname.rpartition(".")
    return f"{PY2_MODULES.get(module, module)}.{name}" if module in PY2_MODULES else qualname


# OmegaConf nodes point back at their container (``_parent``): a cycle in the
# pickle. It is read as a marker (a record of kind "parent": "the container
# this node sits in") and written back as a reference to that container.
PARENT_LINKED = frozenset(n for n in KNOWN_GLOBALS if n.startswith("omegaconf.")
                          and KNOWN_GLOBALS[n] == RECORD and not n.endswith("Metadata"))
OMEGACONF_CONTAINERS = frozenset(("omegaconf.dictconfig.DictConfig",
                                  "omegaconf.listconfig.ListConfig"))
PARENT_KEY = "_parent"


def inert_roles(allow_globals=()) -> dict[str, str]:
    """The shipped list plus this run's ``--allow-global`` names (any construction
    but a call with non-plain arguments, like torch's ``add_safe_globals``)."""
    if not allow_globals:
        return KNOWN_GLOBALS
    from ckptconv.pickle import checked_allow_globals

    roles = dict(KNOWN_GLOBALS)
    for name in checked_allow_globals(allow_globals, known=KNOWN_GLOBALS):
        roles.setdefault(py3_qualname(name), "allowed")
    return roles
