//! Device buffers of any supported dtype, seen by the launch code as (pointer, dtype, length).

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use half::{bf16, f16};

use crate::dtype::{Dtype, Element, HostSlice};

/// A device buffer the loss can read: `CudaSlice<T>`, `CudaView<T>` for f32, f16, bf16.
pub trait DeviceTensor {
    fn dtype(&self) -> Dtype;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw device pointer for reading on `stream`; keep the guard alive until the work
    /// using it is enqueued (it records cudarc's read event).
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

/// A device buffer the loss can write: `CudaSlice<T>`, `CudaViewMut<T>`.
pub trait DeviceTensorMut: DeviceTensor {
    fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

impl<T: Element> DeviceTensor for CudaSlice<T> {
    fn dtype(&self) -> Dtype {
        T::DTYPE
    }
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr(stream)
    }
}

impl<T: Element> DeviceTensorMut for CudaSlice<T> {
    fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr_mut(stream)
    }
}

impl<T: Element> DeviceTensor for CudaView<'_, T> {
    fn dtype(&self) -> Dtype {
        T::DTYPE
    }
    fn len(&self) -> usize {
        CudaView::len(self)
    }
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr(stream)
    }
}

impl<T: Element> DeviceTensor for CudaViewMut<'_, T> {
    fn dtype(&self) -> Dtype {
        T::DTYPE
    }
    fn len(&self) -> usize {
        CudaViewMut::len(self)
    }
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr(stream)
    }
}

impl<T: Element> DeviceTensorMut for CudaViewMut<'_, T> {
    fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.device_ptr_mut(stream)
    }
}

/// An owned device buffer of a dtype chosen at run time (what host uploads produce).
#[derive(Debug)]
pub enum DeviceVec {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    Bf16(CudaSlice<bf16>),
}

impl DeviceVec {
    pub fn upload(
        stream: &std::sync::Arc<CudaStream>,
        data: HostSlice,
    ) -> Result<Self, cudarc::driver::DriverError> {
        Ok(match data {
            HostSlice::F32(s) => DeviceVec::F32(stream.clone_htod(s)?),
            HostSlice::F16(s) => DeviceVec::F16(stream.clone_htod(s)?),
            HostSlice::Bf16(s) => DeviceVec::Bf16(stream.clone_htod(s)?),
        })
    }

    /// A buffer whose contents are whatever the allocator left (0xFF bytes on the emulator): for
    /// outputs the kernels write in full.
    pub(crate) fn uninit(
        stream: &std::sync::Arc<CudaStream>,
        dtype: Dtype,
        len: usize,
    ) -> Result<Self, cudarc::driver::DriverError> {
        // SAFETY: f32, f16 and bf16 are valid for every bit pattern; callers only read what a
        // kernel has written.
        Ok(unsafe {
            match dtype {
                Dtype::F32 => DeviceVec::F32(stream.alloc(len)?),
                Dtype::F16 => DeviceVec::F16(stream.alloc(len)?),
                Dtype::Bf16 => DeviceVec::Bf16(stream.alloc(len)?),
            }
        })
    }

    pub fn zeros(
        stream: &std::sync::Arc<CudaStream>,
        dtype: Dtype,
        len: usize,
    ) -> Result<Self, cudarc::driver::DriverError> {
        Ok(match dtype {
            Dtype::F32 => DeviceVec::F32(stream.alloc_zeros(len)?),
            Dtype::F16 => DeviceVec::F16(stream.alloc_zeros(len)?),
            Dtype::Bf16 => DeviceVec::Bf16(stream.alloc_zeros(len)?),
        })
    }

    fn inner(&self) -> &dyn DeviceTensor {
        match self {
            DeviceVec::F32(s) => s,
            DeviceVec::F16(s) => s,
            DeviceVec::Bf16(s) => s,
        }
    }
}

impl DeviceTensor for DeviceVec {
    fn dtype(&self) -> Dtype {
        self.inner().dtype()
    }
    fn len(&self) -> usize {
        self.inner().len()
    }
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            DeviceVec::F32(s) => s.device_ptr(stream),
            DeviceVec::F16(s) => s.device_ptr(stream),
            DeviceVec::Bf16(s) => s.device_ptr(stream),
        }
    }
}

impl DeviceTensorMut for DeviceVec {
    fn write_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            DeviceVec::F32(s) => s.device_ptr_mut(stream),
            DeviceVec::F16(s) => s.device_ptr_mut(stream),
            DeviceVec::Bf16(s) => s.device_ptr_mut(stream),
        }
    }
}
