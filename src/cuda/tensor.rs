//! Device buffers of any supported dtype, seen by the launch code as (pointer, dtype, length).

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use half::{bf16, f16};

use crate::dtype::{Dtype, Element, HostSlice};

mod sealed {
    /// The kernels write through the pointer and length a `DeviceTensor` reports: only cudarc's
    /// own buffers (whose length is their allocation's) and [`super::DeviceVec`] may be one, so
    /// safe code cannot hand the kernels a pointer that lies about its extent.
    pub trait Sealed {}
    impl<T> Sealed for cudarc::driver::CudaSlice<T> {}
    impl<T> Sealed for cudarc::driver::CudaView<'_, T> {}
    impl<T> Sealed for cudarc::driver::CudaViewMut<'_, T> {}
    impl Sealed for super::DeviceVec {}
}

/// A device buffer the loss can read: `CudaSlice<T>`, `CudaView<T>`, `CudaViewMut<T>` for
/// f32, f16, bf16, and [`DeviceVec`]. Sealed: the kernels trust its pointer and length.
pub trait DeviceTensor: sealed::Sealed {
    /// The element type.
    fn dtype(&self) -> Dtype;
    /// The number of elements.
    fn len(&self) -> usize;
    /// Whether it has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw device pointer for reading on `stream`; keep the guard alive until the work
    /// using it is enqueued (it records cudarc's read event).
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

/// A device buffer the loss can write: `CudaSlice<T>`, `CudaViewMut<T>`, [`DeviceVec`].
pub trait DeviceTensorMut: DeviceTensor {
    /// The raw device pointer for writing on `stream`; keep the guard alive until the work
    /// using it is enqueued (it records cudarc's write event).
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

/// Labels on the device: `CudaSlice`, `CudaView` or `CudaViewMut` of `i64` or `i32` (int32
/// labels are widened on the device by the call's first kernel). Sealed, like [`DeviceTensor`].
pub trait DeviceLabels: sealed::Sealed {
    /// The number of labels.
    fn len(&self) -> usize;
    /// Whether it has no labels.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the labels are `i32` (else `i64`).
    fn is_i32(&self) -> bool;
    /// The raw device pointer for reading on `stream` (see [`DeviceTensor::read_ptr`]).
    fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>);
}

macro_rules! device_labels {
    ($($t:ty => $i32:expr),*) => {$(
        impl DeviceLabels for CudaSlice<$t> {
            fn len(&self) -> usize { CudaSlice::len(self) }
            fn is_i32(&self) -> bool { $i32 }
            fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
                self.device_ptr(stream)
            }
        }
        impl DeviceLabels for CudaView<'_, $t> {
            fn len(&self) -> usize { CudaView::len(self) }
            fn is_i32(&self) -> bool { $i32 }
            fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
                self.device_ptr(stream)
            }
        }
        impl DeviceLabels for CudaViewMut<'_, $t> {
            fn len(&self) -> usize { CudaViewMut::len(self) }
            fn is_i32(&self) -> bool { $i32 }
            fn read_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
                self.device_ptr(stream)
            }
        }
    )*};
}
device_labels!(i64 => false, i32 => true);

/// An owned device buffer of a dtype chosen at run time (what host uploads produce).
#[derive(Debug)]
pub enum DeviceVec {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// IEEE half elements.
    F16(CudaSlice<f16>),
    /// bfloat16 elements.
    Bf16(CudaSlice<bf16>),
}

impl DeviceVec {
    /// Copies host data to a new device buffer on `stream`.
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

    /// A zero-filled device buffer of `len` elements of `dtype`.
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
