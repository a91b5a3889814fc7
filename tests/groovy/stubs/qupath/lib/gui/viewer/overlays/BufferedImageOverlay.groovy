package qupath.lib.gui.viewer.overlays

import qupath.lib.gui.viewer.OverlayOptions
import qupath.lib.regions.ImageRegion

import java.awt.image.BufferedImage

/**
 * STAND-IN for QuPath's BufferedImageOverlay (not QuPath): the constructor of QuPath 0.4-0.7
 * that draws one image over one level-0 region of the slide.
 */
class BufferedImageOverlay {
    final OverlayOptions options
    final Map<ImageRegion, BufferedImage> regions = new LinkedHashMap<ImageRegion, BufferedImage>()

    BufferedImageOverlay(OverlayOptions options, ImageRegion region, BufferedImage img) {
        this.options = options
        regions.put(region, img)
    }

    Map<ImageRegion, BufferedImage> getRegionMap() { return regions }
}
