from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientConfig(_message.Message):
    __slots__ = ("plugins",)
    class Plugins(_message.Message):
        __slots__ = ("admission",)
        ADMISSION_FIELD_NUMBER: _ClassVar[int]
        admission: Plugin
        def __init__(self, admission: _Optional[_Union[Plugin, _Mapping]] = ...) -> None: ...
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    plugins: ClientConfig.Plugins
    def __init__(self, plugins: _Optional[_Union[ClientConfig.Plugins, _Mapping]] = ...) -> None: ...

class Plugin(_message.Message):
    __slots__ = ("cmd", "args")
    CMD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    cmd: str
    args: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cmd: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ...) -> None: ...
