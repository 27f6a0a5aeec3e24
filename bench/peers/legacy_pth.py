"""Reads a legacy (pre-zip) `torch.save` file into numpy arrays without torch.

The format is a run of pickles (magic number, protocol, system info, the object with
persistent ids for its storages, the list of storage keys) followed by each storage's raw
bytes. Only what a state dict of float tensors needs is accepted; anything else refuses to
unpickle, so a hostile file cannot run code.
"""
import collections
import pickle
import struct
import sys

import numpy as np

class Storage:
    def __init__(self, dtype, key): self.dtype, self.key, self.data = dtype, key, None

DTYPES = {'FloatStorage': np.float32, 'LongStorage': np.int64, 'IntStorage': np.int32, 'HalfStorage': np.float16, 'DoubleStorage': np.float64}

class Rebuilt:
    def __init__(self, storage, offset, size, stride): self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

def rebuild_tensor_v2(storage, offset, size, stride, *rest): return Rebuilt(storage, offset, size, stride)

class StorageType:
    def __init__(self, name): self.name = name

class U(pickle.Unpickler):
    def __init__(self, f, storages): super().__init__(f); self.storages = storages
    def find_class(self, module, name):
        if module == 'torch._utils' and name == '_rebuild_tensor_v2': return rebuild_tensor_v2
        if module == 'torch' and name.endswith('Storage'): return StorageType(name)
        if module == 'collections' and name == 'OrderedDict':
            return collections.OrderedDict
        raise pickle.UnpicklingError(f'{module}.{name} not allowed')
    def persistent_load(self, pid):
        kind, stype, key, location, size = pid[:5]
        if key not in self.storages: self.storages[key] = Storage(DTYPES[stype.name], key)
        return self.storages[key]

def load(path):
    with open(path, 'rb') as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        storages = {}
        obj = U(f, storages).load()
        keys = pickle.load(f)
        for k in keys:
            n, = struct.unpack('<q', f.read(8))
            st = storages[k]
            st.data = np.frombuffer(f.read(n * np.dtype(st.dtype).itemsize), dtype=st.dtype)
    out = {}
    for name, t in obj.items():
        st = t.storage
        arr = np.lib.stride_tricks.as_strided(st.data[t.offset:], shape=t.size, strides=[s * st.data.itemsize for s in t.stride]) if t.size else st.data[t.offset:t.offset+1].reshape(())
        out[name] = np.array(arr)
    return out

if __name__ == '__main__':
    w = load(sys.argv[1])
    print(f"{len(w)} tensors, {sum(v.size for v in w.values())} values")
