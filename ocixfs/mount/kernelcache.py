"""Let the kernel keep directory listings and symlink targets of an immutable tree, and
open its files without asking.

The kernel can list a FUSE directory from its page cache without asking the daemon, and
answer ``readlink`` the same way, if the filesystem allows it. For a tree that never
changes both are always right: a second ``find`` over the mount then costs what it costs
on local disk. Likewise it can open files itself (no OPEN, no RELEASE: two requests less
for every file a start-up opens, and the page cache is kept, as ``keep_cache`` would).
pyfuse3 3.5 allows none of it: its OPENDIR reply carries no flags from Python, its INIT
handler wants a fixed set of capabilities, and its READ passes on only the handle.

``enable()`` adds all three without changing pyfuse3's code, through libfuse's stable ABI:

- It redirects the one call pyfuse3's extension makes to ``fuse_session_new`` (its jump
  slot in the procedure linkage table) to a wrapper that edits the operations table just
  before libfuse copies it into the session.
- The wrapped INIT handler also wants ``FUSE_CAP_CACHE_SYMLINKS``.
- The wrapped READDIRPLUS handler sets the request's file handle to the directory's inode
  number, which is what ``Operations.opendir`` would have returned. That lets
  ``Operations.opendir`` answer ``ENOSYS`` on kernels that offer
  ``FUSE_CAP_NO_OPENDIR_SUPPORT``, after which the kernel never sends OPENDIR or
  RELEASEDIR again and caches every listing (``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE``, its
  default for filesystems without OPENDIR).
- The wrapped READ handler does the same for files, so that ``Operations.open`` may answer
  ``ENOSYS`` on kernels that offer ``FUSE_CAP_NO_OPEN_SUPPORT``: the kernel then opens
  every file itself with ``FOPEN_KEEP_CACHE``, sends no RELEASE, and READ carries handle 0.

Separately, ``read_ahead`` widens the kernel's read-ahead window on the mount from FUSE's
128 KiB to 1 MiB (the mount's ``read_ahead_kb`` in sysfs, root only): sequential reads of
a file then come as 1 MiB READs, a quarter as many requests.

Every assumption is checked before anything is written (ELF64 x86-64 extension, the jump
slot, pyfuse3's own handlers at the expected places of the table), and only a check that
passed switches anything on; ``listings_cached()`` (``opens_in_kernel()``) says whether
INIT ran through the wrapper on such a kernel, and ``Operations.opendir`` (``open``)
answers ``ENOSYS`` only then. When a check fails the mount behaves exactly as without this
module.

Layout facts relied on, all part of libfuse 3's stable ABI: ``struct fuse_lowlevel_ops``
has ``init`` at index 0, ``open`` at 14, ``read`` at 15, ``opendir`` at 20 and
``readdirplus`` at 41 (pointers);
``struct fuse_file_info`` has ``uint64_t fh`` at byte 16; ``struct fuse_conn_info`` starts
with seven ``unsigned`` fields, ``capable`` the sixth and ``want`` the seventh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

log = logging.getLogger(__name__)

_OPS_INIT, _OPS_OPEN, _OPS_READ, _OPS_OPENDIR, _OPS_READDIRPLUS = 0, 14, 15, 20, 41
_FILE_INFO_FH_OFFSET = 16
_CONN_CAPABLE_OFFSET = 5 * 4
_CONN_WANT_OFFSET = 6 * 4
_CAP_NO_OPEN_SUPPORT = 1 << 17
_CAP_CACHE_SYMLINKS = 1 << 23
_CAP_NO_OPENDIR_SUPPORT = 1 << 24
_RTLD_DI_LINKMAP = 2
_PROT_READ_WRITE = 0x1 | 0x2
_SHT_SYMTAB, _SHT_RELA = 2, 4
_R_X86_64_JUMP_SLOT = 7
_EM_X86_64 = 62

_SessionNew = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)
# pyfuse3's own handlers run Python code: call them without releasing the GIL.
_PyInit = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_PyReaddirplus = ctypes.PYFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p
)
_PyRead = _PyReaddirplus  # the same signature: (request, inode, size, offset, file info)
_Init = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_Readdirplus = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p
)

if TYPE_CHECKING:
    from _ctypes import CFuncPtr as _FunctionPointer

_PYFUSE3_SYMBOLS = {
    "ops": "__pyx_v_7pyfuse3_fuse_ops",
    "init": "__pyx_f_7pyfuse3_fuse_init",
    "open": "__pyx_f_7pyfuse3_fuse_open",
    "read": "__pyx_f_7pyfuse3_fuse_read",
    "opendir": "__pyx_f_7pyfuse3_fuse_opendir",
    "readdirplus": "__pyx_f_7pyfuse3_fuse_readdirplus",
}


@dataclass
class _State:
    tried: bool = False
    listings: bool = False
    symlinks: bool = False
    opens: bool = False
    keep_alive: list[object] = field(default_factory=list)


_state = _State()


def enable(extension: str) -> None:
    """Prepare listing and symlink caching for the pyfuse3 extension module at ``extension``.

    Takes effect at the next ``pyfuse3.init`` of this process; call it before. Idempotent;
    never raises: a failed check is logged at debug level and leaves pyfuse3 untouched.
    """
    if _state.tried:
        return
    _state.tried = True
    try:
        _redirect_session_new(extension)
    except (OSError, ValueError, AttributeError, IndexError, struct.error) as exc:
        log.debug("kernel caching of listings and symlinks left off: %s", exc)


def listings_cached() -> bool:
    """True once INIT found the wrappers in place and a kernel that lists directories
    without OPENDIR (Linux 5.1+): OPENDIR may then answer ``ENOSYS``."""
    return _state.listings


def opens_in_kernel() -> bool:
    """True once INIT found the wrappers in place and a kernel that opens files without
    OPEN (Linux 5.1+): OPEN may then answer ``ENOSYS``."""
    return _state.opens


def symlinks_cached() -> bool:
    """True once INIT asked the kernel to cache symlink targets (when it can)."""
    return _state.symlinks


READ_AHEAD_KIB = 1024
"""1 MiB: the most one READ carries (libfuse asks for 256 pages a request); a wider window
only makes the first read of a file wait for more."""


def read_ahead(device: int, kib: int = READ_AHEAD_KIB) -> bool:
    """Set the read-ahead window of the mount whose ``st_dev`` is ``device`` to ``kib``
    KiB; False (nothing changed) when that is not allowed (not root) or not possible.
    A write to sysfs: it does not wait on a disk or the daemon."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as knob:
            knob.write(f"{kib}\n")
    except OSError as exc:
        log.debug("read-ahead of the mount left at the default: %s", exc)
        return False
    return True


def _redirect_session_new(extension: str) -> None:
    image = _ElfImage(Path(extension).read_bytes())
    slot = image.jump_slot("fuse_session_new")
    symbols = image.symbols(set(_PYFUSE3_SYMBOLS.values()))
    base = _load_address(extension)
    expected = {key: base + symbols[name] for key, name in _PYFUSE3_SYMBOLS.items()}
    libfuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    session_new = _SessionNew(_address(libfuse.fuse_session_new))

    def session_new_caching(args: int, ops: int, ops_size: int, userdata: int) -> int:
        if ops == expected["ops"]:
            _wrap_handlers(ops, ops_size, expected)
        return int(session_new(args, ops, ops_size, userdata) or 0)

    replacement = _SessionNew(session_new_caching)
    _state.keep_alive += [session_new, replacement]
    _write_pointer(base + slot, _address(replacement))


def _wrap_handlers(ops: int, ops_size: int, expected: dict[str, int]) -> None:
    """Wrap INIT, READ and READDIRPLUS in pyfuse3's table if they (and OPEN, OPENDIR) are
    where they should be."""
    table = (ctypes.c_void_p * (ops_size // ctypes.sizeof(ctypes.c_void_p))).from_address(ops)
    if len(table) <= _OPS_READDIRPLUS or any(
        table[index] != expected[key]
        for index, key in (
            (_OPS_INIT, "init"), (_OPS_OPEN, "open"), (_OPS_READ, "read"),
            (_OPS_OPENDIR, "opendir"), (_OPS_READDIRPLUS, "readdirplus"),
        )
    ):
        log.debug("pyfuse3's operations table is not as expected: caching left off")
        return
    init = _PyInit(expected["init"])
    readdirplus = _PyReaddirplus(expected["readdirplus"])
    read = _PyRead(expected["read"])

    def init_caching(userdata: int, conn: int) -> None:
        init(userdata, conn)
        capable = ctypes.c_uint32.from_address(conn + _CONN_CAPABLE_OFFSET).value
        want = ctypes.c_uint32.from_address(conn + _CONN_WANT_OFFSET)
        if capable & _CAP_CACHE_SYMLINKS:
            want.value |= _CAP_CACHE_SYMLINKS
            _state.symlinks = True
        _state.listings = bool(capable & _CAP_NO_OPENDIR_SUPPORT)
        _state.opens = bool(capable & _CAP_NO_OPEN_SUPPORT)

    def readdirplus_by_inode(request: int, inode: int, size: int, offset: int, info: int) -> None:
        ctypes.c_uint64.from_address(info + _FILE_INFO_FH_OFFSET).value = inode
        readdirplus(request, inode, size, offset, info)

    def read_by_inode(request: int, inode: int, size: int, offset: int, info: int) -> None:
        ctypes.c_uint64.from_address(info + _FILE_INFO_FH_OFFSET).value = inode
        read(request, inode, size, offset, info)

    wrapped_init, wrapped_readdirplus = _Init(init_caching), _Readdirplus(readdirplus_by_inode)
    wrapped_read = _Readdirplus(read_by_inode)
    _state.keep_alive += [init, readdirplus, read, wrapped_init, wrapped_readdirplus,
                          wrapped_read]
    table[_OPS_INIT] = _address(wrapped_init)
    table[_OPS_READ] = _address(wrapped_read)
    table[_OPS_READDIRPLUS] = _address(wrapped_readdirplus)


def _address(function: _FunctionPointer) -> int:
    """Where a ctypes function object (foreign or callback) lives in memory."""
    value = ctypes.cast(function, ctypes.c_void_p).value
    if not value:
        raise ValueError("a function at address 0")
    return int(value)


def _write_pointer(address: int, value: int) -> None:
    """Store ``value`` at ``address`` (a jump slot), making its page writable first."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = address & ~(mmap.PAGESIZE - 1)
    if libc.mprotect(ctypes.c_void_p(page), mmap.PAGESIZE, _PROT_READ_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the jump slot failed")
    ctypes.c_void_p.from_address(address).value = value


def _load_address(extension: str) -> int:
    """The load bias of the already imported ``extension`` (``l_addr`` of its link map)."""
    libc = ctypes.CDLL(None)
    handle = ctypes.CDLL(extension, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
    link_map = ctypes.c_void_p()
    if libc.dlinfo(ctypes.c_void_p(handle._handle), _RTLD_DI_LINKMAP, ctypes.byref(link_map)):
        raise OSError("dlinfo found no link map")
    if not link_map.value:
        raise ValueError("empty link map")
    return int(ctypes.c_size_t.from_address(link_map.value).value)


class _ElfImage:
    """Just enough of an ELF64 x86-64 shared object: its jump slots and its symbols."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
            raise ValueError("not a little-endian ELF64 file")
        if struct.unpack_from("<H", data, 0x12)[0] != _EM_X86_64:
            raise ValueError("not an x86-64 object")
        (section_offset,) = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        self._data = data
        self._sections = [
            struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)
            for i in range(count)
        ]

    def jump_slot(self, name: str) -> int:
        """The offset of ``name``'s PLT jump slot (``R_X86_64_JUMP_SLOT``)."""
        for section in self._sections:
            if section[1] != _SHT_RELA or section[9] != 24:
                continue
            symbols = self._sections[section[6]]
            for position in range(section[4], section[4] + section[5], 24):
                offset, info, _addend = struct.unpack_from("<QQq", self._data, position)
                if info & 0xFFFFFFFF == _R_X86_64_JUMP_SLOT and (
                    self._symbol_name(symbols, info >> 32) == name
                ):
                    return int(offset)
        raise ValueError(f"no jump slot for {name}")

    def symbols(self, names: set[str]) -> dict[str, int]:
        """The values (offsets from the load address) of ``names`` in ``.symtab``."""
        found: dict[str, int] = {}
        for section in self._sections:
            if section[1] != _SHT_SYMTAB:
                continue
            for index in range(section[5] // section[9]):
                name = self._symbol_name(section, index)
                if name in names:
                    position = section[4] + index * section[9] + 8
                    found[name] = int(struct.unpack_from("<Q", self._data, position)[0])
        missing = names - found.keys()
        if missing:
            raise ValueError(f"no symbol {', '.join(sorted(missing))}")
        return found

    def _symbol_name(self, symbols: tuple[int, ...], index: int) -> str:
        strings = self._sections[symbols[6]]
        (name_offset,) = struct.unpack_from("<I", self._data, symbols[4] + index * symbols[9])
        start = strings[4] + name_offset
        return self._data[start : self._data.index(b"\0", start)].decode(errors="replace")
