/* A fake libax_sys.so for the tests: system init and CMM (device memory) with strict caches.
 *
 * Implements the functions pyaxengine's cffi declares for libax_sys (AXERA-TECH/pyaxengine
 * 3554448, axengine/_axe_capi.py): AX_SYS_Init, AX_SYS_Deinit, AX_SYS_MemAllocCached,
 * AX_SYS_MemFree, AX_SYS_MflushCache, AX_SYS_MinvalidateCache.
 *
 * Every cached CMM block exists twice: the host mapping (what pVirAddr points at, what the
 * CPU and numpy see) and the device copy (what the fake NPU reads and writes, found by its
 * physical address). Nothing keeps them in step except the two cache calls:
 *   - AX_SYS_MflushCache copies host -> device,
 *   - AX_SYS_MinvalidateCache copies device -> host,
 * each over the whole 64-byte cache lines covering the range (the Cortex-A53's L1 D-cache
 * line: Arm Cortex-A53 MPCore TRM, "L1 data memory system"; the AX630C's cores), clipped
 * to the block. A write the host does not flush never reaches the NPU; an output the host
 * does not invalidate is read stale. A cache call whose physical and virtual addresses do
 * not name the same byte of one block, or whose range runs past the block, returns -1 and
 * changes nothing (assumed: AXERA's documentation of the error codes is not public).
 * Physical addresses are made up (from 0x140000000 up) and never equal the host pointers,
 * so code that mixes the two up fails.
 *
 * Not AXERA's code: written for vlmd's tests from the declarations above.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fake_ax.h"

#define CACHE_LINE 64
#define ERROR (-1)

typedef struct {
    AX_U64 phys;
    AX_U8 *host;
    AX_U8 *device;
    AX_U64 size;
    char token[32];
} Block;

typedef struct {
    AX_U64 allocs, frees, alloc_bytes, live_bytes;
    AX_U64 flush_calls, flushed_bytes, invalidate_calls, invalidated_bytes, refused_calls;
    AX_U64 inits, deinits;
} FakeSysStats;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Block *blocks;
static size_t n_blocks, cap_blocks;
static AX_U64 next_phys = 0x140000000ULL;
static FakeSysStats stats;

AX_S32 AX_SYS_Init(AX_VOID) {
    pthread_mutex_lock(&lock);
    stats.inits++;
    pthread_mutex_unlock(&lock);
    return 0;
}

AX_S32 AX_SYS_Deinit(AX_VOID) {
    pthread_mutex_lock(&lock);
    stats.deinits++;
    pthread_mutex_unlock(&lock);
    return 0;
}

AX_S32 AX_SYS_MemAllocCached(AX_U64 *phyaddr, AX_VOID **pviraddr, AX_U32 size, AX_U32 align, const AX_S8 *token) {
    if (phyaddr == NULL || pviraddr == NULL || size == 0)
        return ERROR;
    AX_U64 alignment = align < CACHE_LINE ? CACHE_LINE : align;
    if (alignment & (alignment - 1))
        return ERROR;
    AX_U64 rounded = (size + alignment - 1) / alignment * alignment;
    Block block = {0};
    block.size = size;
    block.host = aligned_alloc(alignment, rounded);
    block.device = calloc(1, rounded);
    if (block.host == NULL || block.device == NULL) {
        free(block.host);
        free(block.device);
        return ERROR;
    }
    memset(block.host, 0, rounded);
    if (token != NULL)
        strncpy(block.token, (const char *)token, sizeof block.token - 1);
    pthread_mutex_lock(&lock);
    if (n_blocks == cap_blocks) {
        size_t cap = cap_blocks ? 2 * cap_blocks : 64;
        Block *grown = realloc(blocks, cap * sizeof *blocks);
        if (grown == NULL) {
            pthread_mutex_unlock(&lock);
            free(block.host);
            free(block.device);
            return ERROR;
        }
        blocks = grown;
        cap_blocks = cap;
    }
    block.phys = (next_phys + alignment - 1) / alignment * alignment;
    next_phys = block.phys + rounded + 4096; /* a gap: a range past a block's end is in no block */
    blocks[n_blocks++] = block;
    stats.allocs++;
    stats.alloc_bytes += size;
    stats.live_bytes += size;
    pthread_mutex_unlock(&lock);
    *phyaddr = block.phys;
    *pviraddr = block.host;
    return 0;
}

/* The block holding physical address `phys`, or NULL. Caller holds the lock. */
static Block *by_phys(AX_U64 phys) {
    for (size_t i = 0; i < n_blocks; i++)
        if (phys >= blocks[i].phys && phys < blocks[i].phys + blocks[i].size)
            return &blocks[i];
    return NULL;
}

AX_S32 AX_SYS_MemFree(AX_U64 phyaddr, AX_VOID *pviraddr) {
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < n_blocks; i++) {
        if (blocks[i].phys == phyaddr && blocks[i].host == pviraddr) {
            stats.frees++;
            stats.live_bytes -= blocks[i].size;
            free(blocks[i].host);
            free(blocks[i].device);
            blocks[i] = blocks[--n_blocks];
            pthread_mutex_unlock(&lock);
            return 0;
        }
    }
    stats.refused_calls++;
    pthread_mutex_unlock(&lock);
    return ERROR;
}

/* Copy whole cache lines between the host mapping and the device copy. */
static AX_S32 maintain(AX_U64 phys, AX_VOID *vir, AX_U32 size, int to_device) {
    pthread_mutex_lock(&lock);
    Block *block = by_phys(phys);
    AX_U64 offset = block ? phys - block->phys : 0;
    if (block == NULL || (AX_U8 *)vir != block->host + offset || offset + size > block->size) {
        stats.refused_calls++;
        pthread_mutex_unlock(&lock);
        return ERROR;
    }
    AX_U64 start = offset / CACHE_LINE * CACHE_LINE; /* host blocks are line-aligned */
    AX_U64 end = (offset + size + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
    if (end > block->size)
        end = block->size;
    if (size == 0)
        end = start;
    if (to_device) {
        memcpy(block->device + start, block->host + start, end - start);
        stats.flush_calls++;
        stats.flushed_bytes += size;
    } else {
        memcpy(block->host + start, block->device + start, end - start);
        stats.invalidate_calls++;
        stats.invalidated_bytes += size;
    }
    pthread_mutex_unlock(&lock);
    return 0;
}

AX_S32 AX_SYS_MflushCache(AX_U64 phyaddr, AX_VOID *pviraddr, AX_U32 size) {
    return maintain(phyaddr, pviraddr, size, 1);
}

AX_S32 AX_SYS_MinvalidateCache(AX_U64 phyaddr, AX_VOID *pviraddr, AX_U32 size) {
    return maintain(phyaddr, pviraddr, size, 0);
}

/* ---- not AXERA's API: for libax_engine.so and the tests ---- */

AX_VOID *FAKE_SYS_Device(AX_U64 phys, AX_U64 nbytes) {
    pthread_mutex_lock(&lock);
    Block *block = by_phys(phys);
    AX_VOID *found = NULL;
    if (block != NULL && phys - block->phys + nbytes <= block->size)
        found = block->device + (phys - block->phys);
    pthread_mutex_unlock(&lock);
    return found;
}

/* The host mapping of the block at `phys` (tests poke at both copies to prove they differ). */
AX_VOID *FAKE_SYS_Host(AX_U64 phys) {
    pthread_mutex_lock(&lock);
    Block *block = by_phys(phys);
    AX_VOID *found = block ? block->host + (phys - block->phys) : NULL;
    pthread_mutex_unlock(&lock);
    return found;
}

void FAKE_SYS_GetStats(FakeSysStats *out) {
    pthread_mutex_lock(&lock);
    *out = stats;
    pthread_mutex_unlock(&lock);
}

void FAKE_SYS_ResetStats(void) {
    pthread_mutex_lock(&lock);
    AX_U64 live = stats.live_bytes;
    memset(&stats, 0, sizeof stats);
    stats.live_bytes = live;
    pthread_mutex_unlock(&lock);
}
