//! A range of elements inside a device allocation, usable wherever the device ops take a buffer:
//! how an executor that keeps its parameters, gradients and activations in a few large allocations
//! (llm.c style) passes one tensor of them. Work on spans is ordered by the one stream they name
//! (no events), so every span of an executor belongs to that executor's stream.

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};

use crate::error::{Error, Result};

/// Elements `offset .. offset + len` of a device allocation of `T`.
#[derive(Debug, Clone)]
pub struct DeviceSpan<T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    _t: std::marker::PhantomData<T>,
}

impl<T> DeviceSpan<T> {
    /// Elements `offset .. offset + len` of `slice`, used in order on `slice`'s stream. The span
    /// does not keep the allocation alive: its owner must outlive every use (an executor holds
    /// both). An error when the range is not inside the slice.
    pub fn of(slice: &CudaSlice<T>, offset: usize, len: usize) -> Result<Self> {
        let end = offset.checked_add(len).filter(|&e| e <= slice.len());
        if end.is_none() {
            return Err(Error::ShapeMismatch {
                tensor: "span",
                expected: slice.len(),
                actual: offset.saturating_add(len),
                shape: format!("[{offset}..+{len}] of a buffer of {}", slice.len()),
            });
        }
        let stream = slice.stream().clone();
        let base = slice.device_ptr(&stream).0;
        Ok(DeviceSpan {
            ptr: base + (offset * std::mem::size_of::<T>()) as u64,
            len,
            stream,
            _t: std::marker::PhantomData,
        })
    }
}

impl<T> DeviceSpan<T> {
    /// All of `buf` (a slice, a view or a span), used in order on its stream; like
    /// [`DeviceSpan::of`], the span does not keep `buf`'s allocation alive.
    pub fn over(buf: &impl DevicePtr<T>) -> Self {
        let stream = buf.stream().clone();
        let ptr = buf.device_ptr(&stream).0;
        DeviceSpan {
            ptr,
            len: buf.len(),
            stream,
            _t: std::marker::PhantomData,
        }
    }

    /// All of the writable `buf`, like [`DeviceSpan::over`]: the span may be written through
    /// (device ops take it as an output).
    pub fn over_mut(buf: &mut impl DevicePtrMut<T>) -> Self {
        let stream = buf.stream().clone();
        let ptr = buf.device_ptr_mut(&stream).0;
        DeviceSpan {
            ptr,
            len: buf.len(),
            stream,
            _t: std::marker::PhantomData,
        }
    }

    /// The same memory seen as `len` elements of `U` (at most what the span's bytes hold): f32
    /// statistics laid out inside a narrower buffer.
    #[cfg_attr(not(feature = "trainer"), allow(dead_code))]
    pub(crate) fn cast<U>(&self, len: usize) -> DeviceSpan<U> {
        let bytes = self.len * std::mem::size_of::<T>();
        DeviceSpan {
            ptr: self.ptr,
            len: len.min(bytes / std::mem::size_of::<U>().max(1)),
            stream: self.stream.clone(),
            _t: std::marker::PhantomData,
        }
    }

    /// Elements `offset .. offset + len` of this span; an error when they are not inside it.
    pub fn sub(&self, offset: usize, len: usize) -> Result<Self> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(Error::ShapeMismatch {
                tensor: "span",
                expected: self.len,
                actual: offset.saturating_add(len),
                shape: format!("[{offset}..+{len}] of a span of {}", self.len),
            });
        }
        Ok(DeviceSpan {
            ptr: self.ptr + (offset * std::mem::size_of::<T>()) as u64,
            len,
            stream: self.stream.clone(),
            _t: std::marker::PhantomData,
        })
    }
}

impl<T> DeviceSlice<T> for DeviceSpan<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DeviceSpan<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceSpan<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}
